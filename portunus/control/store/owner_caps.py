"""The ``owner_caps`` table: one rate-limit envelope per (client, owner)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiosqlite

from portunus.control.store.migrations import utc_now


@dataclass(frozen=True, slots=True)
class OwnerCap:
    client_id: str
    owner: str
    rate_limit: dict[str, int]
    updated_at: str


def _cap(row: aiosqlite.Row) -> OwnerCap:
    return OwnerCap(
        row["client_id"], row["owner"], json.loads(row["rate_limit"]), row["updated_at"]
    )


async def list_caps(db: aiosqlite.Connection, client_id: str) -> list[OwnerCap]:
    async with db.execute(
        "SELECT * FROM owner_caps WHERE client_id = ? ORDER BY owner", (client_id,)
    ) as cur:
        return [_cap(r) for r in await cur.fetchall()]


async def caps_by_owner(db: aiosqlite.Connection, client_id: str) -> dict[str, dict[str, int]]:
    """What the client's data plane is sent: ``{owner: rate_limit}``."""
    return {c.owner: c.rate_limit for c in await list_caps(db, client_id)}


async def caps_of_clients(
    db: aiosqlite.Connection, client_ids: list[str]
) -> dict[str, dict[str, dict[str, int]]]:
    """``caps_by_owner`` for each of ``client_ids``, one query per 500 clients."""
    out: dict[str, dict[str, dict[str, int]]] = {c: {} for c in client_ids}
    for i in range(0, len(client_ids), 500):
        chunk = client_ids[i : i + 500]
        async with db.execute(
            f"SELECT * FROM owner_caps WHERE client_id IN ({','.join('?' * len(chunk))}) "
            "ORDER BY client_id, owner",
            tuple(chunk),
        ) as cur:
            for row in await cur.fetchall():
                cap = _cap(row)
                out[cap.client_id][cap.owner] = cap.rate_limit
    return out


async def get_cap(db: aiosqlite.Connection, client_id: str, owner: str) -> OwnerCap | None:
    async with db.execute(
        "SELECT * FROM owner_caps WHERE client_id = ? AND owner = ?", (client_id, owner)
    ) as cur:
        row = await cur.fetchone()
    return _cap(row) if row is not None else None


async def put_cap(
    db: aiosqlite.Connection, client_id: str, owner: str, rate_limit: dict[str, Any]
) -> None:
    await db.execute(
        "INSERT INTO owner_caps (client_id, owner, rate_limit, updated_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (client_id, owner) DO UPDATE SET rate_limit = excluded.rate_limit, "
        "updated_at = excluded.updated_at",
        (client_id, owner, json.dumps(rate_limit, sort_keys=True), utc_now()),
    )


async def delete_cap(db: aiosqlite.Connection, client_id: str, owner: str) -> bool:
    cur = await db.execute(
        "DELETE FROM owner_caps WHERE client_id = ? AND owner = ?", (client_id, owner)
    )
    return (cur.rowcount or 0) > 0


async def delete_owner(db: aiosqlite.Connection, owner: str) -> list[str]:
    """Drop an owner's caps on every client (the user is gone); the clients it had caps on."""
    async with db.execute(
        "SELECT client_id FROM owner_caps WHERE owner = ? ORDER BY client_id", (owner,)
    ) as cur:
        clients = [r["client_id"] for r in await cur.fetchall()]
    await db.execute("DELETE FROM owner_caps WHERE owner = ?", (owner,))
    return clients


async def rule_owners(db: aiosqlite.Connection, client_id: str) -> dict[str, int]:
    """``{owner: rule count}`` of the client's owned rules (unowned rules left out)."""
    async with db.execute(
        "SELECT owner, COUNT(*) AS n FROM rules WHERE client_id = ? AND owner != '' GROUP BY owner",
        (client_id,),
    ) as cur:
        return {r["owner"]: r["n"] for r in await cur.fetchall()}
