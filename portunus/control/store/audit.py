"""Reading the audit trail (rows are written by ``db.write_audit`` inside each change)."""

from __future__ import annotations

import json
from typing import Any

import aiosqlite


async def list_audit(
    db: aiosqlite.Connection,
    since: str | None = None,
    until: str | None = None,
    limit: int = 100,
    cursor: int | None = None,
    actor: str | None = None,
    outcome: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first.  ``cursor`` is the id of the last entry of the previous page;
    ids are monotonic, so paging by id never skips or repeats a row even while
    new rows are being appended."""
    clauses: list[str] = []
    args: list[Any] = []
    if since is not None:
        clauses.append("ts >= ?")
        args.append(since)
    if until is not None:
        clauses.append("ts < ?")
        args.append(until)
    for column, value in (("actor", actor), ("outcome", outcome)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if cursor is not None:
        clauses.append("id < ?")
        args.append(cursor)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    async with db.execute(
        f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?", (*args, limit + 1)
    ) as cur:
        rows = list(await cur.fetchall())
    more = len(rows) > limit
    rows = rows[:limit]
    entries = [
        {
            "id": r["id"],
            "ts": r["ts"],
            "actor": r["actor"],
            "action": r["action"],
            "target": r["target"],
            "outcome": r["outcome"],
            "error_code": r["error_code"],
            "details": json.loads(r["details"]) if r["details"] else None,
        }
        for r in rows
    ]
    return entries, (str(rows[-1]["id"]) if more and rows else None)
