"""Users, per-user API tokens and grants (control process), with their cascades.

Each change commits with its audit row; refusals are audited too.  Removing a
user or revoking a grant removes the rules that lose their footing through
``RuleService.remove`` — the same path as ``remove-rule``, so they drain on
their clients (local or remote) exactly like an operator's removal — and the
answer lists every id that went.
"""

from __future__ import annotations

import secrets
from typing import Any, TypeVar

from msgspec import UnsetType

from portunus.config import Settings
from portunus.control import account_lists
from portunus.control.auth import Principal
from portunus.control.grants import grant_protocols, ordered_range, parse_note
from portunus.control.identity import hash_token
from portunus.control.owner_caps import OwnerCapService
from portunus.control.passwords import (
    hash_password,
    temporary_password,
    validate_display_name,
    validate_password,
    validate_user_id,
)
from portunus.control.policy import require_self
from portunus.control.service import RuleService
from portunus.control.sessions import bounded, remove_setup_token
from portunus.control.store import Store, accounts, audit_refusal, utc_now, write_audit
from portunus.control.store import owner_caps as owner_caps_db
from portunus.control.store import rules as rules_db
from portunus.control.store import users as users_db
from portunus.control.store.accounts import OPERATOR_USER
from portunus.errors import PortunusError, ValidationError
from portunus.schema.check import validate
from portunus.schema.requests import GrantBody, TokenBody, UserBody
from portunus.text import is_ascii_digits

TOKEN_NAME_MAX = 64
T = TypeVar("T")


def _int_id(params: dict[str, Any], key: str, missing: str, what: str) -> int:
    raw = params.get(key)
    if isinstance(raw, str) and is_ascii_digits(raw.strip()) and len(raw.strip()) <= 18:
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise PortunusError(
            missing, f"no {what} {bounded(raw)!s} ({what} ids are positive numbers)", id=raw
        )
    return raw


def _given(value: T | UnsetType) -> T | None:
    """A declared optional field's value, None when the body left it out."""
    return None if isinstance(value, UnsetType) else value


def _user_ref(params: dict[str, Any]) -> str:
    """A user id to look up: any existing name (bootstrap names are freer than new ids)."""
    raw = params.get("user_id")
    if not isinstance(raw, str) or not raw or len(raw) > 64:
        raise ValidationError("validation.user_id", "user_id is required", field="user_id")
    return raw


class UserService:
    def __init__(self, store: Store, settings: Settings, rules: RuleService) -> None:
        self.store = store
        self.settings = settings
        self.rules = rules

    async def _refused(
        self, who: Principal, action: str, target: str | None, exc: PortunusError
    ) -> None:
        await audit_refusal(
            self.store, who.user, action, target, exc, token_id=who.token_id or None
        )
        exc.audited = True

    async def _drain(self, who: Principal, rule_ids: list[int]) -> list[int]:
        """Remove rules through the ordinary remove path; ids actually removed."""
        removed: list[int] = []
        for rule_id in rule_ids:
            try:
                await self.rules.remove(who, {"id": rule_id})
            except PortunusError as exc:
                if exc.code != "rule_not_found":
                    raise
                continue
            removed.append(rule_id)
        return removed

    # ------------------------------------------------------------ users

    async def add(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        target = f"user:{bounded(params.get('user_id'))}"
        try:
            body = validate(params, UserBody)  # as POST /v1/users
            user_id = validate_user_id(body.user_id)  # the id syntax of new users
            role = body.role
            display = validate_display_name(_given(body.display_name))  # control characters
            given = _given(body.password)
            password = validate_password(given) if given is not None else temporary_password()
            digest = await hash_password(password)
            async with self.store.write() as db:
                if await users_db.find_user(db, user_id) is not None:
                    raise PortunusError(
                        "user_exists", f"user {user_id} exists already", user_id=user_id
                    )
                new_id = await users_db.insert_user(
                    db, user_id, role, display, digest, given is None, utc_now()
                )
                await write_audit(
                    db,
                    who.user,
                    "user.add",
                    target,
                    details={"role": role, "temporary_password": given is None},
                )
                user = await users_db.user_by_id(db, new_id)
        except PortunusError as exc:
            await self._refused(who, "user.add", target, exc)
            raise
        assert user is not None
        if role == "superadmin" and given is not None:
            remove_setup_token(self.settings)  # the first-run link has done its job
        out = user.to_json()
        if given is None:
            out["temporary_password"] = password
        return out

    async def list(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        async with self.store.read() as db:
            return await account_lists.users_answer(db, params)

    async def get(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        name = _user_ref(params)
        require_self(who, name, "users")
        async with self.store.read() as db:
            return (await users_db.require_user(db, name)).to_json()

    async def remove(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        target = f"user:{bounded(params.get('user_id'))}"
        try:
            name = _user_ref(params)
            async with self.store.write() as db:
                user = await users_db.require_user(db, name)
                if user.id == who.user_id:
                    raise PortunusError("cannot_remove_self", "you cannot remove your own user")
                if user.name == OPERATOR_USER:
                    raise PortunusError(
                        "conflict", "`operator` holds the operator token and cannot be removed"
                    )
                if (
                    user.role == "superadmin"
                    and await users_db.count_superadmins(db, except_id=user.id) == 0
                ):
                    raise PortunusError(
                        "last_superadmin", f"{name} is the last superadmin; add another first"
                    )
                tokens = await users_db.live_token_ids(db, user.id)
                grants = [g.id for g in await users_db.list_grants(db, user.id)]
                rules = [s.rule_id for s in await rules_db.list_rules(db, owner=user.name)]
                await users_db.delete_user(db, user.id)  # tokens, grants, sessions go with it
                # A later user of the same id must not inherit this one's owner caps.
                capped = await owner_caps_db.delete_owner(db, user.name)
                await write_audit(
                    db,
                    who.user,
                    "user.remove",
                    target,
                    details={
                        "tokens": tokens,
                        "grants": grants,
                        "rules": rules,
                        "owner_caps": capped,
                    },
                )
        except PortunusError as exc:
            await self._refused(who, "user.remove", target, exc)
            raise
        removed = await self._drain(who, rules)
        await OwnerCapService(self.store, self.rules.dataplane).resend(capped)
        return {
            "user_id": user.name,
            "removed_rule_ids": removed,
            "revoked_grant_ids": grants,
            "revoked_token_ids": tokens,
        }

    async def passwd(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        """Set a user's password (or a temporary one) and end that user's sessions."""
        target = f"user:{bounded(params.get('user_id'))}"
        try:
            name = _user_ref(params)
            given = params.get("password")
            password = validate_password(given) if given is not None else temporary_password()
            digest = await hash_password(password)
            async with self.store.write() as db:
                user = await users_db.require_user(db, name)
                await users_db.set_password(db, user.id, digest, change_required=given is None)
                revoked = await users_db.delete_sessions_of(db, user.id)
                await write_audit(
                    db,
                    who.user,
                    "user.password",
                    target,
                    details={"temporary_password": given is None, "revoked_sessions": revoked},
                )
        except PortunusError as exc:
            await self._refused(who, "user.password", target, exc)
            raise
        if user.role == "superadmin" and given is not None:
            remove_setup_token(self.settings)
        out: dict[str, Any] = {
            "user_id": user.name,
            "password_change_required": given is None,
            "revoked_sessions": revoked,
        }
        if given is None:
            out["temporary_password"] = password
        return out

    # ------------------------------------------------------------ tokens

    async def issue_token(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        target = f"user:{bounded(params.get('user_id'))}"
        try:
            name = _user_ref(params)
            require_self(who, name, "tokens")
            body = validate({k: v for k, v in params.items() if k != "user_id"}, TokenBody)
            label = _given(body.name)  # type and length: the TokenBody declaration
            if label is not None and not label.isprintable():
                raise ValidationError(
                    "validation.name",
                    f"name must be 1-{TOKEN_NAME_MAX} printable characters",
                    field="name",
                )
            token = secrets.token_urlsafe(32)
            now = utc_now()
            async with self.store.write() as db:
                user = await users_db.require_user(db, name)
                token_id = await users_db.insert_token(db, user.id, hash_token(token), label, now)
                await write_audit(
                    db,
                    who.user,
                    "token.issue",
                    target,
                    details={"token_id": token_id, "name": label},
                )
        except PortunusError as exc:
            await self._refused(who, "token.issue", target, exc)
            raise
        return {
            "token_id": token_id,
            "token": token,
            "name": label,
            "created_at": now,
            "user_id": user.name,
        }

    async def list_tokens(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("user_id")
        if name is None and not who.is_superadmin:
            name = who.user
        async with self.store.read() as db:
            if name is None:
                return await account_lists.tokens_answer(db, params, None)
            name = _user_ref({"user_id": name})
            require_self(who, name, "tokens")
            user = await users_db.require_user(db, name)
            return await account_lists.tokens_answer(db, params, user)

    async def revoke_token(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        target = f"token:{bounded(params.get('token_id'))}"
        try:
            token_id = _int_id(params, "token_id", "token_not_found", "token")
            now = utc_now()
            async with self.store.write() as db:
                found = await users_db.get_token(db, token_id)
                if found is None:
                    raise PortunusError(
                        "token_not_found", f"no token {token_id}", token_id=token_id
                    )
                require_self(who, found["user_id"], "tokens")
                if found["label"] == "operator":
                    raise PortunusError(
                        "conflict",
                        "the operator token is managed by operator.token / "
                        "server.toml; replace it there",
                    )
                await users_db.revoke_token(db, token_id, now)
                await write_audit(
                    db, who.user, "token.revoke", target, details={"user": found["user_id"]}
                )
        except PortunusError as exc:
            await self._refused(who, "token.revoke", target, exc)
            raise
        return {
            "token_id": token_id,
            "user_id": found["user_id"],
            "revoked_at": found["revoked_at"] or now,
        }

    # ------------------------------------------------------------ grants

    async def add_grant(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        target = f"user:{bounded(params.get('user_id'))}"
        try:
            if isinstance(params.get("protocols"), str):  # the socket also takes "tcp,udp"
                params = {
                    **params,
                    "protocols": [p.strip() for p in params["protocols"].split(",")],
                }
            body = validate(params, GrantBody)  # as POST /v1/grants
            name = body.user_id
            lo, hi = ordered_range(body.listen_port_start, body.listen_port_end)
            protocols = grant_protocols(_given(body.protocols))
            note = parse_note(_given(body.note))
            client_ref = body.client
            async with self.store.write() as db:
                user = await users_db.require_user(db, name)
                if client_ref == "*":
                    client_id = "*"
                else:
                    client_id = (await accounts.resolve_client(db, client_ref)).client_id
                grant_id = await users_db.insert_grant(
                    db, user.id, client_id, lo, hi, protocols, note, utc_now()
                )
                await write_audit(
                    db,
                    who.user,
                    "grant.add",
                    target,
                    details={
                        "grant_id": grant_id,
                        "client_id": client_id,
                        "ports": f"{lo}-{hi}",
                        "protocols": list(protocols),
                    },
                )
                grant = await users_db.get_grant(db, grant_id)
        except PortunusError as exc:
            await self._refused(who, "grant.add", target, exc)
            raise
        assert grant is not None
        return grant.to_json()

    async def list_grants(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("user_id")
        if name is None and not who.is_superadmin:
            name = who.user
        async with self.store.read() as db:
            if name is None:
                return await account_lists.grants_answer(db, params, None)
            name = _user_ref({"user_id": name})
            require_self(who, name, "grants")
            user = await users_db.require_user(db, name)
            return await account_lists.grants_answer(db, params, user)

    async def revoke_grant(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        """Delete the grant, then remove (and drain) every rule of its user that
        no remaining grant covers."""
        target = f"grant:{bounded(params.get('grant_id'))}"
        try:
            grant_id = _int_id(params, "grant_id", "grant_not_found", "grant")
            async with self.store.write() as db:
                grant = await users_db.get_grant(db, grant_id)
                if grant is None:
                    raise PortunusError(
                        "grant_not_found", f"no grant {grant_id}", grant_id=grant_id
                    )
                await users_db.delete_grant(db, grant_id)
                user = await users_db.user_by_id(db, grant.user_id)
                left = await users_db.list_grants(db, grant.user_id)
                owned = await rules_db.list_rules(db, owner=grant.user)
                doomed = (
                    []
                    if user is None or user.role == "superadmin"
                    else [
                        s.rule_id
                        for s in owned
                        if s.state != "draining"
                        and not any(
                            g.covers(
                                s.client_id, s.rule.protocol, s.rule.listen_start, s.rule.listen_end
                            )
                            for g in left
                        )
                    ]
                )
                await write_audit(
                    db,
                    who.user,
                    "grant.revoke",
                    target,
                    details={"user": grant.user, "rules": doomed},
                )
        except PortunusError as exc:
            await self._refused(who, "grant.revoke", target, exc)
            raise
        return {"grant_id": grant_id, "removed_rule_ids": await self._drain(who, doomed)}
