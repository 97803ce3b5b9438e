"""Which rules were added, removed or renamed since the counters last looked.

The counter snapshot (control/counters.py) runs every two seconds and needs, per
rule, only its client (id and name) and owner.  Listing every rule for that costs
a full scan and a hydrate of 30,000 rules on a big fleet, every time, on the event
loop.  Instead the control connection keeps a journal: TEMP triggers (this
connection only, never stored in state.db, so no migration) record the id of every
rule that is inserted, deleted, moved to another client or owner, or whose client
is renamed.  The snapshot reads the whole rule set once, then only the ids the
journal names.  A rolled-back transaction takes its journal rows with it (the temp
table is part of the transaction), so the journal never names a change that did not
happen; the control process is the only writer (store/db.py), so nothing escapes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import aiosqlite

_DDL = """
CREATE TEMP TABLE IF NOT EXISTS counted_rule_changes (rule_id INTEGER PRIMARY KEY);
CREATE TEMP TRIGGER IF NOT EXISTS counted_rule_inserted AFTER INSERT ON main.rules
BEGIN INSERT OR IGNORE INTO counted_rule_changes (rule_id) VALUES (new.id); END;
CREATE TEMP TRIGGER IF NOT EXISTS counted_rule_deleted AFTER DELETE ON main.rules
BEGIN INSERT OR IGNORE INTO counted_rule_changes (rule_id) VALUES (old.id); END;
CREATE TEMP TRIGGER IF NOT EXISTS counted_rule_moved AFTER UPDATE OF client_id, owner ON main.rules
BEGIN INSERT OR IGNORE INTO counted_rule_changes (rule_id) VALUES (new.id); END;
CREATE TEMP TRIGGER IF NOT EXISTS counted_client_renamed AFTER UPDATE OF name ON main.clients
WHEN old.name IS NOT new.name
BEGIN
    INSERT OR IGNORE INTO counted_rule_changes (rule_id)
    SELECT id FROM rules WHERE client_id = new.client_id;
END;
"""

_SELECT = (
    "SELECT r.id, r.client_id, c.name, r.owner FROM rules r"
    " JOIN clients c ON c.client_id = r.client_id"
)
_CHUNK = 500  # ids per IN (...), under SQLite's variable limit


class CountedRule(NamedTuple):
    """What the counters export of a rule: no targets, no ``Rule`` to build."""

    rule_id: int
    client_id: str
    client: str  # the client's name
    owner: str


async def install(db: aiosqlite.Connection) -> None:
    """Create the journal on this connection (idempotent) and empty it."""
    await db.executescript(_DDL)
    await db.execute("DELETE FROM temp.counted_rule_changes")


async def take(db: aiosqlite.Connection) -> list[int]:
    """The ids journalled since the last call, and forget them."""
    async with db.execute("SELECT rule_id FROM temp.counted_rule_changes") as cur:
        ids = [int(r[0]) for r in await cur.fetchall()]
    if ids:
        await db.execute("DELETE FROM temp.counted_rule_changes")
    return ids


async def read_all(db: aiosqlite.Connection) -> list[CountedRule]:
    """Every rule (once, when the counters start)."""
    async with db.execute(_SELECT) as cur:
        return [CountedRule(int(r[0]), r[1], r[2], r[3]) for r in await cur.fetchall()]


async def read(db: aiosqlite.Connection, ids: Iterable[int]) -> dict[int, CountedRule]:
    """The rules among ``ids`` that still exist (an id missing here was deleted)."""
    wanted = list(ids)
    out: dict[int, CountedRule] = {}
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i : i + _CHUNK]
        marks = ",".join("?" * len(chunk))
        async with db.execute(f"{_SELECT} WHERE r.id IN ({marks})", chunk) as cur:
            for r in await cur.fetchall():
                out[int(r[0])] = CountedRule(int(r[0]), r[1], r[2], r[3])
    return out
