"""Owner caps (control process): one rate-limit envelope per (client, owner).

The RPC methods ``owner_caps.list|get|set|delete`` land here.  A cap is stored
(with its audit row) and then the client's whole set is sent to its data plane,
which applies it to open connections at once; a client that is away gets the
set when it (re)connects (``RuleService.sync_client``).  The caps object is a
rule's ``rate_limit`` and is validated by the same function.
"""

from __future__ import annotations

import re
from typing import Any

from portunus.control.auth import Principal
from portunus.control.dataplane import LOCAL, DataPlane
from portunus.control.store import Store, accounts, audit_refusal, write_audit
from portunus.control.store import owner_caps as caps_db
from portunus.control.store import users as users_db
from portunus.control.store.accounts import ClientRow
from portunus.errors import PortunusError, ValidationError, reject_unknown_fields
from portunus.rules import validate_rate_limit

# A user id (the contract's users: [a-z][a-z0-9_-]{0,31}); rules carry it as ``owner``.
OWNER_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def parse_owner(params: dict[str, Any]) -> str:
    owner = params.get("owner")
    if not isinstance(owner, str) or not OWNER_RE.fullmatch(owner):
        raise ValidationError(
            "validation.owner",
            "owner must be a user id: a lowercase letter, then up to 31 of a-z 0-9 _ -",
            field="owner",
        )
    return owner


def parse_caps(params: dict[str, Any]) -> dict[str, int]:
    """The caps object of ``owner_caps.set``: a rule's rate_limit, and not empty."""
    raw = params.get("rate_limit")
    if raw is not None and not isinstance(raw, dict):
        raise ValidationError(
            "validation.rate_limit", "rate_limit must be an object", field="rate_limit"
        )
    caps = validate_rate_limit(raw)
    if not caps:
        raise PortunusError(
            "preflight",
            "no caps given: set at least one of bandwidth_in_bps, bandwidth_out_bps, "
            "new_connections_per_sec, concurrent_connections (delete the owner cap to lift it)",
        )
    return caps


def _target(client_id: str, owner: str) -> str:
    return f"client:{client_id}/owner:{owner}"


def cap_json(client: ClientRow, cap: caps_db.OwnerCap) -> dict[str, Any]:
    return {
        "client_id": client.client_id,
        "client": client.name,
        "owner": cap.owner,
        "rate_limit": cap.rate_limit,
        "updated_at": cap.updated_at,
    }


class OwnerCapService:
    def __init__(self, store: Store, dataplane: DataPlane) -> None:
        self.store = store
        self.dataplane = dataplane

    async def _client(self, params: dict[str, Any]) -> ClientRow:
        async with self.store.read() as db:
            return await accounts.resolve_client(db, params.get("client"))

    async def list_caps(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every owner with rules or a cap on the client, capped or not."""
        client = await self._client(params)
        async with self.store.read() as db:
            caps = {c.owner: c for c in await caps_db.list_caps(db, client.client_id)}
            counts = await caps_db.rule_owners(db, client.client_id)
        owners = [
            {
                "owner": owner,
                "rule_count": counts.get(owner, 0),
                "rate_limit": caps[owner].rate_limit if owner in caps else None,
                "updated_at": caps[owner].updated_at if owner in caps else None,
            }
            for owner in sorted(set(caps) | set(counts))
        ]
        return {"client_id": client.client_id, "client": client.name, "owners": owners}

    async def get_cap(self, params: dict[str, Any]) -> dict[str, Any]:
        client = await self._client(params)
        owner = parse_owner(params)
        async with self.store.read() as db:
            cap = await caps_db.get_cap(db, client.client_id, owner)
        if cap is None:
            raise _not_found(client, owner)
        return cap_json(client, cap)

    async def set_cap(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        target = f"client:{params.get('client')}/owner:{params.get('owner')}"
        try:
            reject_unknown_fields(params, {"client", "owner", "rate_limit"})
            client = await self._client(params)
            owner = parse_owner(params)
            target = _target(client.client_id, owner)
            caps = parse_caps(params)
            self._check_capability(client)
            async with self.store.write() as db:
                # A cap for a user that does not exist would never apply: a typo, refused.
                await users_db.require_user(db, owner)
                previous = await caps_db.get_cap(db, client.client_id, owner)
                await caps_db.put_cap(db, client.client_id, owner, caps)
                await write_audit(
                    db,
                    who.user,
                    "owner_cap.set",
                    target,
                    details={
                        "rate_limit": caps,
                        "previous": previous.rate_limit if previous else None,
                        "token_id": who.token_id,
                    },
                )
                cap = await caps_db.get_cap(db, client.client_id, owner)
                everything = await caps_db.caps_by_owner(db, client.client_id)
            assert cap is not None
        except PortunusError as exc:
            await self._audit_error(who, "owner_cap.set", target, exc)
            raise
        await self.dataplane.owner_caps(client.client_id, everything)
        return cap_json(client, cap)

    async def delete_cap(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        target = f"client:{params.get('client')}/owner:{params.get('owner')}"
        try:
            client = await self._client(params)
            owner = parse_owner(params)
            target = _target(client.client_id, owner)
            async with self.store.write() as db:
                previous = await caps_db.get_cap(db, client.client_id, owner)
                if previous is None:
                    raise _not_found(client, owner)
                await caps_db.delete_cap(db, client.client_id, owner)
                await write_audit(
                    db,
                    who.user,
                    "owner_cap.delete",
                    target,
                    details={
                        "previous": previous.rate_limit,
                        "token_id": who.token_id,
                    },
                )
                everything = await caps_db.caps_by_owner(db, client.client_id)
        except PortunusError as exc:
            await self._audit_error(who, "owner_cap.delete", target, exc)
            raise
        await self.dataplane.owner_caps(client.client_id, everything)
        return {}

    async def resend(self, client_ids: list[str]) -> None:
        """Send these clients their (changed) full sets, e.g. after a user's removal."""
        for client_id in client_ids:
            async with self.store.read() as db:
                everything = await caps_db.caps_by_owner(db, client_id)
            await self.dataplane.owner_caps(client_id, everything)

    def _check_capability(self, client: ClientRow) -> None:
        """A connected edge that does not enforce caps would run the owner uncapped.
        An offline client is not checked: it gets its caps when it connects."""
        if client.client_id == LOCAL:
            return
        info = self.dataplane.info(client.client_id)
        if info is not None and "rate_limit" not in info.capabilities:
            raise PortunusError(
                "rate_limit_unsupported_by_client",
                f"client {client.name} ({client.client_id}) does not enforce rate limits "
                f"(it advertised: {', '.join(sorted(info.capabilities)) or 'nothing'}); nothing was stored",
                client_id=client.client_id,
                capability="rate_limit",
            )

    async def _audit_error(
        self, who: Principal, action: str, target: str, exc: PortunusError
    ) -> None:
        await audit_refusal(self.store, who.user, action, target, exc)


def _not_found(client: ClientRow, owner: str) -> PortunusError:
    return PortunusError(
        "owner_cap_not_found",
        f"owner {owner} has no cap on client {client.name} ({client.client_id})",
        client_id=client.client_id,
        owner=owner,
    )
