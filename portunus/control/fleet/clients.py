"""Client operations of the control RPC: enroll, rename, revoke, delete.

Each change commits with its audit row before the live session hears of it, the
same discipline as ``RuleService``; a refused request is audited as an error.
``local`` is the server's own node and cannot be renamed, revoked or deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from msgspec import UNSET

from portunus.control.auth import Principal
from portunus.control.dataplane import LinkInfo
from portunus.control.fleet.enrollment import (
    advertised_host,
    build_uri,
    create_enrollment,
    enroll_command,
    validate_client_name,
)
from portunus.control.fleet.remote_link import RemoteLink
from portunus.control.service import StateSink
from portunus.control.store import Store, accounts, audit_refusal, utc_now, write_audit
from portunus.control.store import rules as rules_db
from portunus.control.store.accounts import LOCAL_CLIENT_ID, ClientRow
from portunus.errors import PortunusError
from portunus.ipc import edge_messages as em
from portunus.schema.check import validate
from portunus.schema.requests import ClientEnrollmentBody, ClientRename

REVOKED_GOODBYE = em.Error(code="revoked", message="this client was revoked by the server")


def _ref(params: dict[str, Any]) -> str:
    ref = params.get("id")
    if isinstance(ref, int) and not isinstance(ref, bool):
        ref = str(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise PortunusError("validation.id", "id must be a client id or name", field="id")
    return ref.strip()


class ClientService:
    """One instance per control process."""

    def __init__(
        self,
        store: Store,
        link: RemoteLink,
        fingerprint: str,
        listen_host: str,
        port: Callable[[], int],
        on_state: StateSink | None = None,
    ) -> None:
        self.store = store
        self.link = link
        self.fingerprint = fingerprint
        self.listen_host = listen_host
        self.port = port
        self.on_state = on_state or (lambda rule, state: None)

    def entry(self, row: ClientRow, rule_count: int) -> dict[str, Any]:
        """The ``clients.list`` shape of one remote client."""
        return client_entry(row, self.link.info(row.client_id), rule_count)

    async def _audit_error(
        self, who: Principal, action: str, target: str | None, exc: PortunusError
    ) -> None:
        await audit_refusal(self.store, who.user, action, target, exc)

    @staticmethod
    def _not_local(row: ClientRow, verb: str) -> None:
        if row.client_id == LOCAL_CLIENT_ID:
            raise PortunusError(
                "conflict",
                f"`local` is the server's own node; it cannot be {verb}",
                client_id=row.client_id,
            )

    async def _rule_count(self, client_id: str) -> int:
        async with self.store.read() as db:
            return (await rules_db.count_rules_by_client(db)).get(client_id, 0)

    # ------------------------------------------------------------ operations

    async def enroll(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        target = f"client-name:{params.get('name')}"
        try:
            body = validate(params, ClientEnrollmentBody)  # as POST /v1/client-enrollments
            name = validate_client_name(body.name)  # reserved and control characters
            ttl = body.ttl_secs
            address = None if body.address is UNSET else body.address
            host = advertised_host(address, self.listen_host)
            async with self.store.write() as db:
                new = await create_enrollment(db, name, ttl)
                await write_audit(
                    db,
                    who.user,
                    "client.enroll",
                    f"client:{new.client.client_id}",
                    details={
                        "name": name,
                        "ttl_secs": ttl,
                        "address": host,
                        "token_id": who.token_id,
                    },
                )
        except PortunusError as exc:
            await self._audit_error(who, "client.enroll", target, exc)
            raise
        uri = build_uri(host, self.port(), new.code, self.fingerprint)
        return {
            "client_id": new.client.client_id,
            "client_name": new.client.name,
            "expires_at": new.expires_at,
            "uri": uri,
            "command": enroll_command(uri),
        }

    async def rename(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        """New name; same id, rules and live session (the client is told)."""
        target = f"client:{params.get('id')}"
        try:
            ref = _ref(params)
            body = validate({k: v for k, v in params.items() if k != "id"}, ClientRename)
            name = validate_client_name(body.name)
            async with self.store.write() as db:
                row = await accounts.resolve_client(db, ref)
                self._not_local(row, "renamed")
                target = f"client:{row.client_id}"
                before = await rules_db.list_rules(db, client_id=row.client_id)
                await db.execute(
                    "UPDATE clients SET name = ? WHERE client_id = ?", (name, row.client_id)
                )
                await write_audit(
                    db, who.user, "client.rename", target, details={"from": row.name, "to": name}
                )
        except PortunusError as exc:
            await self._audit_error(who, "client.rename", target, exc)
            raise
        self.link.renamed(row.client_id, name)
        # The rule-state gauge is labelled by client name: move every series.
        for s in before:
            self.on_state(s.rule, None)
            self.on_state(s.rule.with_changes(client=name), s.state)
        renamed = ClientRow(row.client_id, name, row.created_at, row.revoked_at)
        return self.entry(renamed, len(before))

    async def revoke(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        """Invalidate the token and close the live session at once (``error:
        revoked``).  Revoking a revoked client again changes nothing."""
        target = f"client:{params.get('id')}"
        banned: str | None = None
        revoked_rules: list[Any] = []
        try:
            ref = _ref(params)
            async with self.store.write() as db:
                row = await accounts.resolve_client(db, ref, include_revoked=True)
                self._not_local(row, "revoked")
                target = f"client:{row.client_id}"
                already = row.revoked_at is not None
                if not already:
                    if row.client_id not in self.link.banned:
                        banned = row.client_id
                        self.link.banned.add(banned)
                    row = ClientRow(row.client_id, row.name, row.created_at, utc_now())
                    await db.execute(
                        "UPDATE clients SET revoked_at = ? WHERE client_id = ?",
                        (row.revoked_at, row.client_id),
                    )
                # Its rules no longer forward anywhere: they leave "active" for "revoked"
                # (kept, listed, counted; deleting the client removes them).
                revoked_rules = [
                    s
                    for s in await rules_db.list_rules(db, client_id=row.client_id)
                    if s.state != "revoked"
                ]
                await db.execute(
                    "UPDATE rules SET state = 'revoked', failure_reason = NULL WHERE client_id = ?",
                    (row.client_id,),
                )
                await write_audit(
                    db, who.user, "client.revoke", target, details={"already_revoked": already}
                )
        except PortunusError as exc:
            if banned is not None:  # nothing was committed: the client may come back
                self.link.banned.discard(banned)
            await self._audit_error(who, "client.revoke", target, exc)
            raise
        for s in revoked_rules:
            self.on_state(s.rule, "revoked")
        kicked = self.link.kick(row.client_id, REVOKED_GOODBYE, "revoked")
        out = self.entry(row, await self._rule_count(row.client_id))
        out.update(connected=False, revoked_at=row.revoked_at, disconnected=kicked)
        return out

    async def delete(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        """Remove a revoked client with its rules and enrollment codes."""
        target = f"client:{params.get('id')}"
        try:
            ref = _ref(params)
            async with self.store.write() as db:
                row = await accounts.resolve_client(db, ref, include_revoked=True)
                self._not_local(row, "deleted")
                target = f"client:{row.client_id}"
                if row.revoked_at is None:
                    raise PortunusError(
                        "conflict",
                        f"client {row.name} ({row.client_id}) is not revoked; revoke it first "
                        f"(`portunus-server revoke {row.client_id}`)",
                        client_id=row.client_id,
                    )
                stored = await rules_db.list_rules(db, client_id=row.client_id)
                await db.execute("DELETE FROM rules WHERE client_id = ?", (row.client_id,))
                await db.execute("DELETE FROM clients WHERE client_id = ?", (row.client_id,))
                await write_audit(
                    db,
                    who.user,
                    "client.delete",
                    target,
                    details={"name": row.name, "rules_deleted": [s.rule_id for s in stored]},
                )
        except PortunusError as exc:
            await self._audit_error(who, "client.delete", target, exc)
            raise
        for s in stored:
            self.on_state(s.rule, None)
        self.link.kick(row.client_id, REVOKED_GOODBYE, "deleted")
        self.link.forget(row.client_id)
        return {}


def client_entry(row: ClientRow, info: LinkInfo | None, rule_count: int) -> dict[str, Any]:
    """The ``clients.list`` shape of one client, ``info`` from its data plane (None: offline)."""
    return {
        "client_id": row.client_id,
        "client_name": row.name,
        "connected": info is not None,
        "remote_addr": info.remote_addr if info else None,
        "connected_since": info.connected_since if info else None,
        "version": info.version if info else None,
        "capabilities": info.capabilities if info else [],
        "rule_count": rule_count,
    }
