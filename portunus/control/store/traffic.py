"""Traffic history in state.db: per-rule deltas in 1-minute and 1-hour buckets.

The sampler (``portunus.control.traffic``) adds one delta per rule and sample into
the bucket of both resolutions; idle rules write nothing, so the table grows with
traffic, not with the number of rules.  ``prune`` enforces the retention (7 days
of minutes, 90 days of hours) and a hard row cap per resolution, oldest first, so
the database stays bounded whatever the traffic pattern.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiosqlite

MINUTE = 60
HOUR = 3600
RETENTION = {MINUTE: 7 * 86400, HOUR: 90 * 86400}
# 1,000 busy rules for 7 days would be ~10 M minute rows; the cap keeps the newest.
MAX_ROWS = {MINUTE: 2_000_000, HOUR: 1_000_000}


@dataclass(frozen=True, slots=True)
class Delta:
    """What one rule moved since the previous sample."""

    rule_id: int
    client_id: str
    owner: str
    bytes_in: int
    bytes_out: int
    connections: int


@dataclass(frozen=True, slots=True)
class RuleKey:
    """What the sampler needs of a rule (not the whole hydrated rule)."""

    rule_id: int
    client_id: str
    owner: str


async def rule_keys(db: aiosqlite.Connection, owner: str | None = None) -> list[RuleKey]:
    sql = "SELECT id, client_id, owner FROM rules"
    args: tuple[str, ...] = ()
    if owner is not None:
        sql, args = sql + " WHERE owner = ?", (owner,)
    async with db.execute(sql + " ORDER BY id", args) as cur:
        return [RuleKey(r[0], r[1], r[2]) async for r in cur]


async def rule_owner(db: aiosqlite.Connection, rule_id: int) -> str | None:
    """The owner of a rule, or of a removed rule's history; None when neither exists."""
    for sql in (
        "SELECT owner FROM rules WHERE id = ?",
        "SELECT owner FROM traffic WHERE rule_id = ? LIMIT 1",
    ):
        async with db.execute(sql, (rule_id,)) as cur:
            row = await cur.fetchone()
        if row is not None:
            return str(row[0])
    return None


def bucket_of(ts: float, resolution: int) -> int:
    return int(ts) // resolution * resolution


async def add_deltas(db: aiosqlite.Connection, ts: float, deltas: Iterable[Delta]) -> int:
    """Add each delta to its minute and hour bucket; returns the rules written."""
    rows: list[tuple[Any, ...]] = []
    for d in deltas:
        if not (d.bytes_in or d.bytes_out or d.connections):
            continue
        for res in (MINUTE, HOUR):
            rows.append(
                (
                    res,
                    bucket_of(ts, res),
                    d.rule_id,
                    d.client_id,
                    d.owner,
                    d.bytes_in,
                    d.bytes_out,
                    d.connections,
                )
            )
    if rows:
        await db.executemany(
            "INSERT INTO traffic (resolution, bucket, rule_id, client_id, owner, bytes_in, bytes_out, "
            "connections) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (resolution, rule_id, bucket) DO UPDATE SET "
            "bytes_in = bytes_in + excluded.bytes_in, bytes_out = bytes_out + excluded.bytes_out, "
            "connections = connections + excluded.connections",
            rows,
        )
    return len(rows) // 2


async def prune(
    db: aiosqlite.Connection, now: float, max_rows: dict[int, int] | None = None
) -> int:
    """Drop buckets past their retention, then the oldest beyond the row cap."""
    caps = max_rows or MAX_ROWS
    removed = 0
    for res, keep in RETENTION.items():
        cur = await db.execute(
            "DELETE FROM traffic WHERE resolution = ? AND bucket < ?",
            (res, bucket_of(now - keep, res)),
        )
        removed += cur.rowcount
        async with db.execute("SELECT count(*) FROM traffic WHERE resolution = ?", (res,)) as c:
            row = await c.fetchone()
        excess = (row[0] if row else 0) - caps[res]
        if excess > 0:
            cur = await db.execute(
                "DELETE FROM traffic WHERE resolution = ? AND bucket <= (SELECT bucket FROM traffic "
                "WHERE resolution = ? ORDER BY bucket LIMIT 1 OFFSET ?)",
                (res, res, excess - 1),
            )
            removed += cur.rowcount
    return removed


async def series(
    db: aiosqlite.Connection,
    resolution: int,
    start: int,
    end: int,
    *,
    rule_id: int | None = None,
    client_id: str | None = None,
    owner: str | None = None,
) -> list[dict[str, int]]:
    """Buckets in ``[start, end)`` summed over the matching rules, oldest first;
    buckets without traffic are absent (the reader fills gaps with zeros)."""
    where = ["resolution = ?", "bucket >= ?", "bucket < ?"]
    args: list[Any] = [resolution, bucket_of(start, resolution), end]
    for column, value in (("rule_id", rule_id), ("client_id", client_id), ("owner", owner)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    sql = (
        "SELECT bucket, sum(bytes_in), sum(bytes_out), sum(connections) FROM traffic "
        f"WHERE {' AND '.join(where)} GROUP BY bucket ORDER BY bucket"
    )
    async with db.execute(sql, args) as cur:
        return [
            {"ts": r[0], "bytes_in": r[1], "bytes_out": r[2], "connections": r[3]}
            async for r in cur
        ]


async def top_rules(
    db: aiosqlite.Connection, since: int, limit: int, owner: str | None = None
) -> list[dict[str, Any]]:
    """Rules by bytes moved since ``since`` (minute buckets), most first, with what a
    list shows of each (client, protocol, ports, state; null once the rule is gone)."""
    where = "resolution = ? AND bucket >= ?"
    args: list[object] = [MINUTE, bucket_of(since, MINUTE)]
    if owner is not None:
        where += " AND owner = ?"
        args.append(owner)
    sql = (
        "SELECT t.rule_id, t.bytes_in, t.bytes_out, c.name, r.protocol, r.listen_start, r.listen_end, r.state "
        "FROM (SELECT rule_id, sum(bytes_in) AS bytes_in, sum(bytes_out) AS bytes_out "
        f"      FROM traffic INDEXED BY traffic_by_time WHERE {where} "
        "      GROUP BY rule_id ORDER BY sum(bytes_in) + sum(bytes_out) DESC LIMIT ?) t "
        "LEFT JOIN rules r ON r.id = t.rule_id LEFT JOIN clients c ON c.client_id = r.client_id "
        "ORDER BY t.bytes_in + t.bytes_out DESC"
    )
    async with db.execute(sql, [*args, limit]) as cur:
        return [
            {
                "rule": r[0],
                "bytes_in": r[1],
                "bytes_out": r[2],
                "client": r[3],
                "protocol": r[4],
                "listen": None
                if r[5] is None
                else (str(r[5]) if r[5] == r[6] else f"{r[5]}-{r[6]}"),
                "state": r[7],
            }
            async for r in cur
        ]
