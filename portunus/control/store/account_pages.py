"""Pages and index counts of users, grants and tokens (``users.list``,
``grants.list``, ``tokens.list``).

Each function reads ``limit`` rows after a key (keyset paging, ``store.paging``)
and each count is a ``COUNT(*)`` the indexes answer: users by their UNIQUE
``name`` (and ``users_by_role``), grants by ``grants_by_user`` /
``grants_by_client``, tokens by ``tokens_by_user`` (migrations ``_V2``,
``_V_USERS``, ``_V_PAGING``).  Nothing here reads every row into Python.
"""

from __future__ import annotations

from typing import Any

import aiosqlite

from portunus.control.store.users import (
    _GRANTS,
    _TOKENS,
    GrantRow,
    UserRow,
    _grant,
    _user,
    token_json,
)


def _prefix_bounds(prefix: str) -> tuple[str, str]:
    """``name >= lo AND name < hi`` selects exactly the names starting with ``prefix``
    (an index range: no LIKE, so ``%`` and ``_`` are plain characters)."""
    return prefix, prefix + "\U0010ffff"


def _where(clauses: list[str]) -> str:
    return ("WHERE " + " AND ".join(clauses)) if clauses else ""


def _user_filters(role: str | None, prefix: str | None) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if role is not None:
        clauses.append("role = ?")
        args.append(role)
    if prefix is not None:
        clauses.append("name >= ? AND name < ?")
        args += _prefix_bounds(prefix)
    return clauses, args


async def users_page(
    db: aiosqlite.Connection,
    limit: int,
    after: str | None = None,
    *,
    role: str | None = None,
    prefix: str | None = None,
) -> list[UserRow]:
    """Up to ``limit`` users by user id (``users.name``), after ``after``."""
    clauses, args = _user_filters(role, prefix)
    if after is not None:
        clauses.append("name > ?")
        args.append(after)
    sql = f"SELECT * FROM users {_where(clauses)} ORDER BY name LIMIT ?"
    async with db.execute(sql, (*args, limit)) as cur:
        return [_user(r) for r in await cur.fetchall()]


async def count_users(
    db: aiosqlite.Connection, *, role: str | None = None, prefix: str | None = None
) -> int:
    clauses, args = _user_filters(role, prefix)
    return await _count(db, f"SELECT COUNT(*) FROM users {_where(clauses)}", args)


def _grant_filters(user_id: int | None, client_id: str | None) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if user_id is not None:
        clauses.append("g.user_id = ?")
        args.append(user_id)
    if client_id is not None:
        clauses.append("g.client_id = ?")
        args.append(client_id)
    return clauses, args


async def grants_page(
    db: aiosqlite.Connection,
    limit: int,
    after: int | None = None,
    *,
    user_id: int | None = None,
    client_id: str | None = None,
) -> list[GrantRow]:
    """Up to ``limit`` grants by grant id, after ``after`` (ids only grow)."""
    clauses, args = _grant_filters(user_id, client_id)
    if after is not None:
        clauses.append("g.id > ?")
        args.append(after)
    sql = f"{_GRANTS} {_where(clauses)} ORDER BY g.id LIMIT ?"
    async with db.execute(sql, (*args, limit)) as cur:
        return [_grant(r) for r in await cur.fetchall()]


async def count_grants(
    db: aiosqlite.Connection, *, user_id: int | None = None, client_id: str | None = None
) -> int:
    clauses, args = _grant_filters(user_id, client_id)
    return await _count(db, f"SELECT COUNT(*) FROM grants g {_where(clauses)}", args)


async def tokens_page(
    db: aiosqlite.Connection, limit: int, after: int | None = None, *, user_id: int | None = None
) -> list[dict[str, Any]]:
    """Up to ``limit`` tokens by token id, after ``after``."""
    clauses, args = _token_filters(user_id)
    if after is not None:
        clauses.append("t.id > ?")
        args.append(after)
    sql = f"{_TOKENS} {_where(clauses)} ORDER BY t.id LIMIT ?"
    async with db.execute(sql, (*args, limit)) as cur:
        return [token_json(r) for r in await cur.fetchall()]


def _token_filters(user_id: int | None) -> tuple[list[str], list[Any]]:
    return (["t.user_id = ?"], [user_id]) if user_id is not None else ([], [])


async def count_tokens(db: aiosqlite.Connection, *, user_id: int | None = None) -> int:
    clauses, args = _token_filters(user_id)
    return await _count(db, f"SELECT COUNT(*) FROM tokens t {_where(clauses)}", args)


async def _count(db: aiosqlite.Connection, sql: str, args: list[Any]) -> int:
    async with db.execute(sql, args) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0
