"""``clients.list`` and ``clients.get``: one page of enrolled clients, or one client.

A server may carry ten thousand edge clients; a call must cost what one page
costs, not what the whole fleet costs.  Order: ``local`` first, then by client
id (a ULID, so enrollment order and stable: a client enrolled while someone pages
lands after every page already read).  Paging is keyset (``store.paging``).

Filters: ``connected`` (true/false; the live sessions are in memory, so
``connected: true`` walks the sorted session ids, not the table) and
``name_prefix`` (case-sensitive).  ``total`` is the number of clients matching
the filters, counted from the partial indexes of migration ``_V_FLEET`` and the
session table, never by reading every row.
"""

from __future__ import annotations

import bisect
from typing import Any

import aiosqlite

from portunus.control.dataplane import DataPlane
from portunus.control.fleet.clients import client_entry
from portunus.control.fleet.remote_link import RemoteLink
from portunus.control.store import accounts
from portunus.control.store.accounts import LOCAL_CLIENT_ID, ClientRow
from portunus.control.store.paging import decode_cursor, encode_cursor, parse_limit
from portunus.errors import PortunusError, ValidationError, reject_unknown_fields

KIND = "clients"
_PARAMS = {"limit", "cursor", "connected", "name_prefix"}
_LIVE = "revoked_at IS NULL"


def _prefix_bounds(prefix: str) -> tuple[str, str]:
    """``name >= lo AND name < hi`` selects exactly the names starting with ``prefix``
    (an index range: no LIKE, so ``%`` and ``_`` are plain characters)."""
    return prefix, prefix + "\U0010ffff"


def _filters(params: dict[str, Any]) -> tuple[bool | None, str | None]:
    reject_unknown_fields(params, _PARAMS)
    connected = params.get("connected")
    if connected is not None and not isinstance(connected, bool):
        raise ValidationError(
            "validation.connected", "connected must be true or false", field="connected"
        )
    prefix = params.get("name_prefix")
    if prefix is not None and (not isinstance(prefix, str) or not 1 <= len(prefix) <= 64):
        raise ValidationError(
            "validation.name_prefix", "name_prefix must be 1-64 characters", field="name_prefix"
        )
    return connected, prefix or None


async def _rule_counts(
    db: aiosqlite.Connection, ids: list[str], owner: str | None = None
) -> dict[str, int]:
    """Rule counts of this page's clients only (``rules_by_slot`` starts with client_id);
    with ``owner``, only that owner's rules (what a ``user`` is shown)."""
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    sql = f"SELECT client_id, COUNT(*) FROM rules WHERE client_id IN ({marks})"
    args: list[Any] = list(ids)
    if owner is not None:
        sql += " AND owner = ?"
        args.append(owner)
    async with db.execute(sql + " GROUP BY client_id", args) as cur:
        return {r[0]: r[1] for r in await cur.fetchall()}


async def _rows_after(
    db: aiosqlite.Connection, after: str, prefix: str | None, n: int
) -> list[ClientRow]:
    """Up to ``n`` live remote clients with an id after ``after``, in id order."""
    sql = f"SELECT client_id, name, created_at, revoked_at FROM clients WHERE {_LIVE} AND client_id > ?"
    args: list[Any] = [after]
    if prefix is not None:
        sql += " AND name >= ? AND name < ?"
        args += _prefix_bounds(prefix)
    async with db.execute(sql + " ORDER BY client_id LIMIT ?", (*args, n)) as cur:
        return [ClientRow(r[0], r[1], r[2], r[3]) for r in await cur.fetchall()]


async def _rows_by_id(
    db: aiosqlite.Connection, ids: list[str], prefix: str | None
) -> list[ClientRow]:
    marks = ",".join("?" * len(ids))
    sql = f"SELECT client_id, name, created_at, revoked_at FROM clients WHERE {_LIVE} AND client_id IN ({marks})"
    args: list[Any] = list(ids)
    if prefix is not None:
        sql += " AND name >= ? AND name < ?"
        args += _prefix_bounds(prefix)
    async with db.execute(sql, args) as cur:
        found = {r[0]: ClientRow(r[0], r[1], r[2], r[3]) for r in await cur.fetchall()}
    return [found[i] for i in ids if i in found]


async def _count(db: aiosqlite.Connection, prefix: str | None) -> int:
    """Live clients (``local`` included) matching ``prefix``, from a partial index."""
    args: tuple[str, ...] = ()
    if prefix is None:
        sql = f"SELECT COUNT(*) FROM clients INDEXED BY clients_live WHERE {_LIVE}"
    else:
        sql = f"SELECT COUNT(*) FROM clients INDEXED BY clients_live_by_name WHERE {_LIVE} AND name >= ? AND name < ?"
        args = _prefix_bounds(prefix)
    async with db.execute(sql, args) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def _order(client_id: str) -> tuple[bool, str]:
    """The list's order: ``local`` first, then by id."""
    return client_id != LOCAL_CLIENT_ID, client_id


async def _scoped_page(
    db: aiosqlite.Connection,
    plane: DataPlane,
    only: set[str],
    connected: bool | None,
    prefix: str | None,
    after: str | None,
    limit: int,
    owner: str | None,
) -> dict[str, Any]:
    """A page of the few clients a ``user``'s grants name: read by id, filtered and
    paged in memory (a user holds a handful of grants, not ten thousand)."""
    ids = sorted(only, key=_order)
    rows = [
        r
        for r in await _rows_by_id(db, ids, prefix)
        if connected is None or plane.connected(r.client_id) == connected
    ]
    total = len(rows)
    if after is not None:
        rows = [r for r in rows if _order(r.client_id) > _order(after)]
    next_cursor = encode_cursor(KIND, [rows[limit - 1].client_id]) if len(rows) > limit else None
    rows = rows[:limit]
    counts = await _rule_counts(db, [r.client_id for r in rows], owner)
    return {
        "clients": [
            client_entry(r, plane.info(r.client_id), counts.get(r.client_id, 0)) for r in rows
        ],
        "next_cursor": next_cursor,
        "total": total,
    }


async def list_page(
    db: aiosqlite.Connection,
    plane: DataPlane,
    remote: RemoteLink | None,
    params: dict[str, Any],
    *,
    only: set[str] | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    """``{clients, next_cursor, total}`` for one ``clients.list`` call (``remote``:
    the live edge sessions; None when the gateway is off).  ``only``: the client ids
    the caller may see (None: all); ``owner``: count only that owner's rules."""
    connected, prefix = _filters(params)
    limit = parse_limit(params.get("limit"))
    key = decode_cursor(KIND, params.get("cursor"), arity=1)
    after = None if key is None else str(key[0])
    if only is not None:
        return await _scoped_page(db, plane, only, connected, prefix, after, limit, owner)
    want = limit + 1

    def keep(row: ClientRow) -> bool:
        return connected is None or plane.connected(row.client_id) == connected

    rows: list[ClientRow] = []
    if after is None:  # ``local`` heads the first page
        local = await _rows_by_id(db, [LOCAL_CLIENT_ID], prefix)
        rows += [r for r in local if keep(r)]
    remote_after = "" if after in (None, LOCAL_CLIENT_ID) else after
    live = remote.live_ids() if remote is not None else []
    if connected is True:
        start = bisect.bisect_right(live, remote_after)
        while len(rows) < want and start < len(live):
            chunk = [i for i in live[start : start + want] if i != LOCAL_CLIENT_ID]
            start += want
            rows += [r for r in await _rows_by_id(db, chunk, prefix) if keep(r)]
    else:
        while len(rows) < want:
            batch = await _rows_after(db, remote_after, prefix, max(want, 256))
            batch = [r for r in batch if r.client_id != LOCAL_CLIENT_ID]
            if not batch:
                break
            remote_after = batch[-1].client_id
            rows += [r for r in batch if keep(r)]
    rows = rows[:want]
    next_cursor = encode_cursor(KIND, [rows[limit - 1].client_id]) if len(rows) > limit else None
    rows = rows[:limit]

    counts = await _rule_counts(db, [r.client_id for r in rows], owner)
    total = await _count(db, prefix)
    if connected is not None:
        live_matching = (
            len(live)
            if prefix is None or remote is None
            else sum(1 for i in live if remote.live_name(i).startswith(prefix))
        )
        if plane.connected(LOCAL_CLIENT_ID) and (
            prefix is None or LOCAL_CLIENT_ID.startswith(prefix)
        ):
            live_matching += 1
        total = live_matching if connected else max(0, total - live_matching)
    return {
        "clients": [
            client_entry(r, plane.info(r.client_id), counts.get(r.client_id, 0)) for r in rows
        ],
        "next_cursor": next_cursor,
        "total": total,
    }


async def get_one(
    db: aiosqlite.Connection,
    plane: DataPlane,
    ref: Any,
    *,
    only: set[str] | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    """``clients.get``: one client by id or name (``not_found`` / ``ambiguous_client``).
    A client outside ``only`` (a ``user``'s grants) is not found: its existence is
    not the caller's business."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        ref = str(ref)
    if not isinstance(ref, str) or not ref.strip() or len(ref) > 128:
        raise ValidationError("validation.id", "id must be a client id or name", field="id")
    row = await accounts.resolve_client(db, ref.strip())
    if only is not None and row.client_id not in only:
        raise PortunusError(
            "client_not_found", f"no client named or with id {ref.strip()!r}", client=ref.strip()
        )
    counts = await _rule_counts(db, [row.client_id], owner)
    return client_entry(row, plane.info(row.client_id), counts.get(row.client_id, 0))
