"""Rule rows: a ``Rule`` (what the data plane needs) plus its control-plane facts.

Functions take the connection handed out by ``Store.write()``/``Store.read()``
so that a change and its audit row share the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiosqlite

from portunus.control.store.migrations import utc_now
from portunus.errors import PortunusError
from portunus.rules import Rule, Target

STATES = ("pending", "active", "failed", "draining", "revoked")  # revoked: its client was

_SELECT = (
    "SELECT r.*, c.name AS client_name FROM rules r JOIN clients c ON c.client_id = r.client_id"
)


@dataclass(frozen=True, slots=True)
class StoredRule:
    """A rule as stored: ``rule.id`` is ``str(rule_id)``, ``rule.client`` the client name."""

    rule_id: int
    client_id: str
    rule: Rule
    state: str
    failure_reason: str | None
    created_at: str

    def to_json(self) -> dict[str, Any]:
        """The rule JSON of docs/rpc.md (CLI --format json and HTTP alike)."""
        r = self.rule
        out: dict[str, Any] = {"id": self.rule_id, "client": r.client, "client_id": self.client_id}
        out["protocol"] = r.protocol
        if r.is_range:
            out["listen_port_start"] = r.listen_start
            out["listen_port_end"] = r.listen_end
        else:
            out["listen_port"] = r.listen_start
        out["targets"] = [_target_json(t) for t in r.targets]
        out.update(
            sni_pattern=r.sni,
            proxy_protocol=r.proxy_protocol,
            prefer_ipv6=r.prefer_ipv6,
            health_check_interval_secs=r.health_check_interval_secs,
            idle_timeout_secs=r.idle_timeout_secs,
            rate_limit=r.rate_limit,
            owner=r.owner,
            state=self.state,
            failure_reason=self.failure_reason,
            created_at=self.created_at,
        )
        return out


def _target_json(t: Target) -> dict[str, Any]:
    if t.port_end is not None and t.port_end != t.port:
        d: dict[str, Any] = {"host": t.host, "port_start": t.port, "port_end": t.port_end}
    else:
        d = {"host": t.host, "port": t.port}
    d["priority"] = t.priority
    if t.proxy_protocol is not None:
        d["proxy_protocol"] = t.proxy_protocol
    return d


async def _hydrate(db: aiosqlite.Connection, rows: list[aiosqlite.Row]) -> list[StoredRule]:
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    targets: dict[int, list[Target]] = {i: [] for i in ids}
    marks = ",".join("?" * len(ids))
    async with db.execute(
        f"SELECT * FROM rule_targets WHERE rule_id IN ({marks}) ORDER BY rule_id, position", ids
    ) as cur:
        async for t in cur:
            targets[t["rule_id"]].append(
                Target(
                    host=t["host"],
                    port=t["port"],
                    port_end=t["port_end"],
                    priority=t["priority"],
                    proxy_protocol=t["proxy_protocol"],
                )
            )
    out: list[StoredRule] = []
    for row in rows:
        rule = Rule(
            id=str(row["id"]),
            client=row["client_name"],
            owner=row["owner"],
            protocol=row["protocol"],
            listen_start=row["listen_start"],
            listen_end=row["listen_end"],
            targets=tuple(targets[row["id"]]),
            sni=row["sni_pattern"],
            proxy_protocol=row["proxy_protocol"],
            prefer_ipv6=bool(row["prefer_ipv6"]),
            rate_limit=json.loads(row["rate_limit"]) if row["rate_limit"] else None,
            health_check_interval_secs=row["health_check_interval_secs"],
            sni_fallback=bool(row["sni_fallback"]),
            idle_timeout_secs=row["idle_timeout_secs"],
        )
        out.append(
            StoredRule(
                rule_id=row["id"],
                client_id=row["client_id"],
                rule=rule,
                state=row["state"],
                failure_reason=row["failure_reason"],
                created_at=row["created_at"],
            )
        )
    return out


async def _query(db: aiosqlite.Connection, where: str, args: tuple[Any, ...]) -> list[StoredRule]:
    async with db.execute(f"{_SELECT} {where} ORDER BY r.id", args) as cur:
        rows = list(await cur.fetchall())
    return await _hydrate(db, rows)


async def get_rule(db: aiosqlite.Connection, rule_id: int) -> StoredRule | None:
    found = await _query(db, "WHERE r.id = ?", (rule_id,))
    return found[0] if found else None


async def get_rules(db: aiosqlite.Connection, rule_ids: list[int]) -> list[StoredRule]:
    """The rules among ``rule_ids`` that exist, by id: one query for a node's whole
    answer instead of one per rule (500 ids per query, under SQLite's variable limit)."""
    out: list[StoredRule] = []
    for i in range(0, len(rule_ids), 500):
        chunk = rule_ids[i : i + 500]
        out.extend(await _query(db, f"WHERE r.id IN ({','.join('?' * len(chunk))})", tuple(chunk)))
    return out


class RuleState(NamedTuple):
    """A rule's client and state: what an answer from a node is checked against."""

    client_id: str
    state: str
    failure_reason: str | None


async def states_of(db: aiosqlite.Connection, rule_ids: list[int]) -> dict[int, RuleState]:
    """The state of each rule among ``rule_ids`` that exists, without building the
    rules (after a restart every node re-confirms all of its rules at once)."""
    out: dict[int, RuleState] = {}
    for i in range(0, len(rule_ids), 500):
        chunk = rule_ids[i : i + 500]
        async with db.execute(
            "SELECT id, client_id, state, failure_reason FROM rules"
            f" WHERE id IN ({','.join('?' * len(chunk))})",
            chunk,
        ) as cur:
            for row in await cur.fetchall():
                out[int(row[0])] = RuleState(row[1], row[2], row[3])
    return out


async def rules_of_clients(
    db: aiosqlite.Connection, client_ids: list[str]
) -> dict[str, list[StoredRule]]:
    """Every rule of each of ``client_ids``, by id (the syncs of a reconnect storm
    read in one query per 500 clients instead of one per client)."""
    out: dict[str, list[StoredRule]] = {c: [] for c in client_ids}
    for i in range(0, len(client_ids), 500):
        chunk = client_ids[i : i + 500]
        where = f"WHERE r.client_id IN ({','.join('?' * len(chunk))})"
        for s in await _query(db, where, tuple(chunk)):
            out[s.client_id].append(s)
    return out


async def require_rule(db: aiosqlite.Connection, rule_id: int) -> StoredRule:
    stored = await get_rule(db, rule_id)
    if stored is None:
        raise PortunusError("rule_not_found", f"no rule with id {rule_id}", id=rule_id)
    return stored


async def list_rules(
    db: aiosqlite.Connection,
    client_id: str | None = None,
    owner: str | None = None,
    *,
    state: str | None = None,
    protocol: str | None = None,
    limit: int | None = None,
    after: int | None = None,
) -> list[StoredRule]:
    """Rules by id; ``limit`` rules with an id above ``after`` (keyset paging, see
    control.rule_list), so a page of a long list hydrates only its own rows."""
    where, args = _filters(client_id, owner, state, protocol)
    if after is not None:
        where = f"{where} AND r.id > ?" if where else "WHERE r.id > ?"
        args = (*args, after)
    page = ""
    if limit is not None:
        page = " LIMIT ?"
        args = (*args, limit)
    async with db.execute(f"{_SELECT} {where} ORDER BY r.id{page}", args) as cur:
        rows = list(await cur.fetchall())
    return await _hydrate(db, rows)


def _filters(
    client_id: str | None, owner: str | None, state: str | None = None, protocol: str | None = None
) -> tuple[str, tuple[Any, ...]]:
    """The WHERE of a filtered list or count.  The first filter set in the order
    client, owner, state, protocol (about the most to the least selective) drives the
    index (migration ``_V_PAGING``: one per column, each ordered by id too); the others
    are written ``+col = ?``, which SQLite never uses as an index term.  Without this
    hint and without table statistics the planner may walk ``rules_by_protocol`` (half
    the table) to find one client's rules."""
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("r.client_id", client_id),
        ("r.owner", owner),
        ("r.state", state),
        ("r.protocol", protocol),
    ):
        if value is not None:
            clauses.append(f"{'+' if clauses else ''}{column} = ?")
            args.append(value)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)


async def count_rules(
    db: aiosqlite.Connection,
    client_id: str | None = None,
    owner: str | None = None,
    state: str | None = None,
    protocol: str | None = None,
) -> int:
    where, args = _filters(client_id, owner, state, protocol)
    async with db.execute(f"SELECT COUNT(*) FROM rules r {where}", args) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def count_rules_by_state(
    db: aiosqlite.Connection, owner: str | None = None
) -> dict[str, int]:
    where, args = _filters(None, owner)
    async with db.execute(
        f"SELECT r.state, COUNT(*) FROM rules r {where} GROUP BY r.state", args
    ) as cur:
        return {row[0]: row[1] for row in await cur.fetchall()}


async def rules_overlapping(
    db: aiosqlite.Connection, client_id: str, protocol: str, lo: int, hi: int
) -> list[StoredRule]:
    """Rules that hold a port slot in ``lo..hi`` (draining rules have given theirs up)."""
    return await _query(
        db,
        "WHERE r.client_id = ? AND r.protocol = ? AND r.listen_start <= ? AND r.listen_end >= ? "
        "AND r.state != 'draining'",
        (client_id, protocol, hi, lo),
    )


async def insert_rule(db: aiosqlite.Connection, client_id: str, rule: Rule) -> int:
    """Insert as ``pending``; return the new id (rule.id is ignored)."""
    cur = await db.execute(
        "INSERT INTO rules (client_id, protocol, listen_start, listen_end, sni_pattern, "
        "proxy_protocol, prefer_ipv6, rate_limit, health_check_interval_secs, owner, state, "
        "created_at, sni_fallback, idle_timeout_secs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
        (
            client_id,
            rule.protocol,
            rule.listen_start,
            rule.listen_end,
            rule.sni,
            rule.proxy_protocol,
            int(rule.prefer_ipv6),
            json.dumps(rule.rate_limit) if rule.rate_limit else None,
            rule.health_check_interval_secs,
            rule.owner,
            utc_now(),
            int(rule.sni_fallback),
            rule.idle_timeout_secs,
        ),
    )
    rule_id = cur.lastrowid
    assert rule_id is not None
    await db.executemany(
        "INSERT INTO rule_targets (rule_id, position, host, port, port_end, priority, "
        "proxy_protocol) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (rule_id, i, t.host, t.port, t.port_end, t.priority, t.proxy_protocol)
            for i, t in enumerate(rule.targets)
        ],
    )
    return rule_id


async def set_state(
    db: aiosqlite.Connection, rule_id: int, state: str, reason: str | None = None
) -> None:
    await db.execute(
        "UPDATE rules SET state = ?, failure_reason = ? WHERE id = ?", (state, reason, rule_id)
    )


async def set_rate_limit(
    db: aiosqlite.Connection, rule_id: int, rate_limit: dict[str, int] | None
) -> None:
    await db.execute(
        "UPDATE rules SET rate_limit = ? WHERE id = ?",
        (json.dumps(rate_limit) if rate_limit else None, rule_id),
    )


async def set_targets(db: aiosqlite.Connection, rule_id: int, targets: Sequence[Target]) -> None:
    """Replace a rule's targets (an update in place: same id, same listener)."""
    await db.execute("DELETE FROM rule_targets WHERE rule_id = ?", (rule_id,))
    await db.executemany(
        "INSERT INTO rule_targets (rule_id, position, host, port, port_end, priority, "
        "proxy_protocol) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (rule_id, i, t.host, t.port, t.port_end, t.priority, t.proxy_protocol)
            for i, t in enumerate(targets)
        ],
    )


async def delete_rule(db: aiosqlite.Connection, rule_id: int) -> None:
    await db.execute("DELETE FROM rules WHERE id = ?", (rule_id,))


async def count_rules_by_client(db: aiosqlite.Connection) -> dict[str, int]:
    async with db.execute("SELECT client_id, COUNT(*) FROM rules GROUP BY client_id") as cur:
        return {row[0]: row[1] for row in await cur.fetchall()}
