"""``users.list``, ``grants.list`` and ``tokens.list``: one page each, with filters
and an index-backed ``total`` (store.account_pages), like ``clients.list`` and
``rules.list``.

Orders: users by user id (alphabetical; a user added while someone pages lands
where its id sorts, and no user that existed is repeated or skipped); grants and
tokens by id (ids only grow: a new one lands after every page already read).
Who may see what is decided before this module (policy, ``require_self``); the
cursor only positions the next page, every filter is applied again on each one.
"""

from __future__ import annotations

from typing import Any

import aiosqlite

from portunus.bounds import NAME_PREFIX_LEN
from portunus.control.store import account_pages as pages
from portunus.control.store import accounts
from portunus.control.store import users as users_db
from portunus.control.store.paging import decode_cursor, page, parse_limit
from portunus.errors import ValidationError, reject_unknown_fields

ROLES = ("superadmin", "user")
PREFIX_MAX = int(NAME_PREFIX_LEN.hi)


def _key_int(kind: str, raw: Any) -> int | None:
    """The id a cursor of ``kind`` carries (None without one)."""
    key = decode_cursor(kind, raw, arity=1)
    if key is None:
        return None
    if not isinstance(key[0], int) or key[0] < 0:
        raise _bad_cursor(kind)
    return key[0]


def _bad_cursor(kind: str) -> ValidationError:
    return ValidationError(
        "validation.cursor",
        f"cursor is not a next_cursor of this {kind} list; start again without a cursor",
        field="cursor",
    )


def _role(params: dict[str, Any]) -> str | None:
    role = params.get("role")
    if role in (None, ""):
        return None
    if role not in ROLES:
        raise ValidationError(
            "validation.role", f"role must be one of {', '.join(ROLES)}", field="role"
        )
    return str(role)


def _prefix(params: dict[str, Any]) -> str | None:
    prefix = params.get("name_prefix")
    if prefix in (None, ""):
        return None
    if not isinstance(prefix, str) or len(prefix) > PREFIX_MAX:
        raise ValidationError(
            "validation.name_prefix",
            f"name_prefix must be 1-{PREFIX_MAX} characters",
            field="name_prefix",
        )
    return prefix


async def users_answer(db: aiosqlite.Connection, params: dict[str, Any]) -> dict[str, Any]:
    """``{users, next_cursor, total}``: ``limit``, ``cursor``, ``role``, ``name_prefix``
    (user ids starting with it, case-sensitive)."""
    reject_unknown_fields(params, {"limit", "cursor", "role", "name_prefix"})
    limit = parse_limit(params.get("limit"))
    role, prefix = _role(params), _prefix(params)
    key = decode_cursor("users", params.get("cursor"), arity=1)
    after = None if key is None else key[0]
    if key is not None and not isinstance(after, str):
        raise _bad_cursor("users")
    rows = await pages.users_page(
        db, limit + 1, after if isinstance(after, str) else None, role=role, prefix=prefix
    )
    shown, next_cursor = page(rows, limit, "users", key=lambda u: (u.name,))
    return {
        "users": [u.to_json() for u in shown],
        "next_cursor": next_cursor,
        "total": await pages.count_users(db, role=role, prefix=prefix),
    }


async def _client_filter(db: aiosqlite.Connection, raw: Any) -> str | None:
    """A ``client`` filter: ``*`` (the grants for every client) or a client id or name."""
    if raw in (None, ""):
        return None
    if raw == "*":
        return "*"
    return (await accounts.resolve_client(db, raw, include_revoked=True)).client_id


async def grants_answer(
    db: aiosqlite.Connection, params: dict[str, Any], user: users_db.UserRow | None
) -> dict[str, Any]:
    """``{grants, next_cursor, total}`` of ``user`` (None: everyone's); ``client``
    keeps the grants naming that client (``*``: the grants for every client)."""
    reject_unknown_fields(params, {"user_id", "client", "limit", "cursor"})
    limit = parse_limit(params.get("limit"))
    after = _key_int("grants", params.get("cursor"))
    client_id = await _client_filter(db, params.get("client"))
    user_id = None if user is None else user.id
    rows = await pages.grants_page(db, limit + 1, after, user_id=user_id, client_id=client_id)
    shown, next_cursor = page(rows, limit, "grants", key=lambda g: (g.id,))
    return {
        "grants": [g.to_json() for g in shown],
        "next_cursor": next_cursor,
        "total": await pages.count_grants(db, user_id=user_id, client_id=client_id),
    }


async def tokens_answer(
    db: aiosqlite.Connection, params: dict[str, Any], user: users_db.UserRow | None
) -> dict[str, Any]:
    """``{tokens, next_cursor, total}`` of ``user`` (None: everyone's), by token id."""
    reject_unknown_fields(params, {"user_id", "limit", "cursor"})
    limit = parse_limit(params.get("limit"))
    after = _key_int("tokens", params.get("cursor"))
    user_id = None if user is None else user.id
    rows = await pages.tokens_page(db, limit + 1, after, user_id=user_id)
    shown, next_cursor = page(rows, limit, "tokens", key=lambda t: (t["token_id"],))
    return {
        "tokens": shown,
        "next_cursor": next_cursor,
        "total": await pages.count_tokens(db, user_id=user_id),
    }
