"""Clients (forwarding nodes) and users/tokens (people and scripts) in state.db."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import aiosqlite

from portunus.control.store.migrations import utc_now
from portunus.errors import PortunusError

LOCAL_CLIENT_ID = "local"
OPERATOR_USER = "operator"
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_ulid() -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32 (26 chars).
    Sortable by creation time, so client ids list in enrollment order."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


@dataclass(frozen=True, slots=True)
class ClientRow:
    client_id: str
    name: str
    created_at: str
    revoked_at: str | None


def _client(row: aiosqlite.Row) -> ClientRow:
    return ClientRow(row["client_id"], row["name"], row["created_at"], row["revoked_at"])


async def list_clients(db: aiosqlite.Connection) -> list[ClientRow]:
    """Clients that are not revoked; ``local`` first, then by id (= enrollment time)."""
    async with db.execute(
        "SELECT * FROM clients WHERE revoked_at IS NULL ORDER BY client_id != 'local', client_id"
    ) as cur:
        return [_client(r) for r in await cur.fetchall()]


async def resolve_client(
    db: aiosqlite.Connection, ref: object, include_revoked: bool = False
) -> ClientRow:
    """Find a client by id or by name (every verb and route takes either).

    An exact id wins over a name; ``local`` is the reserved name of this node.
    Several clients with the name → ``ambiguous_client`` listing their ids.
    Revoked clients are found only with ``include_revoked`` (revoke, delete).
    """
    if not isinstance(ref, str) or not ref.strip():
        raise PortunusError(
            "validation.client", "client must be a client name or id", field="client"
        )
    ref = ref.strip()
    live = "" if include_revoked else " AND revoked_at IS NULL"
    async with db.execute(f"SELECT * FROM clients WHERE client_id = ?{live}", (ref,)) as cur:
        row = await cur.fetchone()
    if row is not None:
        return _client(row)
    async with db.execute(
        f"SELECT * FROM clients WHERE name = ?{live} ORDER BY client_id", (ref,)
    ) as cur:
        rows = list(await cur.fetchall())
    if not rows:
        raise PortunusError("client_not_found", f"no client named or with id {ref!r}", client=ref)
    if len(rows) > 1:
        ids = [r["client_id"] for r in rows]
        raise PortunusError(
            "ambiguous_client",
            f"{len(rows)} clients are named {ref!r}; use one of the ids: {', '.join(ids)}",
            client=ref,
            client_ids=ids,
        )
    return _client(rows[0])


async def insert_client(db: aiosqlite.Connection, name: str) -> ClientRow:
    """Register a client (enrollment comes in a later issue; tests use this now)."""
    row = ClientRow(new_ulid(), name, utc_now(), None)
    await db.execute(
        "INSERT INTO clients (client_id, name, created_at) VALUES (?, ?, ?)",
        (row.client_id, row.name, row.created_at),
    )
    return row


# ------------------------------------------------------------------ users / tokens


@dataclass(frozen=True, slots=True)
class TokenRow:
    token_id: int
    token_hash: str
    user_id: int
    user: str
    role: str
    last_used_at: str | None
    password_change_required: bool = False


async def find_token(db: aiosqlite.Connection, token_hash: str) -> TokenRow | None:
    """A live token (a revoked one is as unknown as a wrong one)."""
    async with db.execute(
        "SELECT t.id, t.token_hash, t.last_used_at, u.id AS user_id, u.name, u.role, "
        "u.password_change_required "
        "FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = ? AND t.revoked_at IS NULL",
        (token_hash,),
    ) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    return TokenRow(
        row["id"],
        row["token_hash"],
        row["user_id"],
        row["name"],
        row["role"],
        row["last_used_at"],
        bool(row["password_change_required"]),
    )


async def touch_token(db: aiosqlite.Connection, token_id: int, when: str) -> None:
    await db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (when, token_id))


async def upsert_operator_token(db: aiosqlite.Connection, token_hash: str) -> tuple[int, bool]:
    """Make ``token_hash`` the one operator token; return ``(token_id, changed)``.

    A new operator.token replaces the previous one (the old token stops working).
    """
    async with db.execute("SELECT id FROM users WHERE name = ?", (OPERATOR_USER,)) as cur:
        user = await cur.fetchone()
    if user is None:  # deleted by hand: recreate the built-in holder
        cur2 = await db.execute(
            "INSERT INTO users (name, role, created_at) VALUES (?, 'superadmin', ?)",
            (OPERATOR_USER, utc_now()),
        )
        user_id = cur2.lastrowid
    else:
        user_id = user["id"]
    async with db.execute("SELECT id, token_hash FROM tokens WHERE label = 'operator'") as cur:
        current = await cur.fetchone()
    if current is not None and current["token_hash"] == token_hash:
        return current["id"], False
    # The same hash might already belong to another user's token: refuse to alias it.
    async with db.execute("SELECT id FROM tokens WHERE token_hash = ?", (token_hash,)) as cur:
        clash = await cur.fetchone()
    if clash is not None:
        raise PortunusError(
            "conflict", "the operator token equals an existing user's token; pick a fresh one"
        )
    if current is not None:
        await db.execute(
            "UPDATE tokens SET token_hash = ?, user_id = ?, created_at = ?, last_used_at = NULL, "
            "revoked_at = NULL WHERE id = ?",
            (token_hash, user_id, utc_now(), current["id"]),
        )
        return current["id"], True
    cur3 = await db.execute(
        "INSERT INTO tokens (user_id, token_hash, label, name, created_at) VALUES (?, ?, 'operator', 'operator', ?)",
        (user_id, token_hash, utc_now()),
    )
    assert cur3.lastrowid is not None
    return cur3.lastrowid, True
