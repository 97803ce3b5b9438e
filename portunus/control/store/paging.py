"""Keyset paging shared by every list of the control RPC: ``limit`` and an opaque ``cursor``.

A list is ordered by a unique key (a tuple of SQL values); a page is "the next
``limit`` rows whose key is greater than the last key of the previous page".
Unlike ``OFFSET``, a keyset page never repeats or skips a row that existed when
the first page was read, however many rows are inserted or deleted in between,
and costs an index range read instead of a scan of every row before it.

The cursor carries the list's name and the last key, as base64url JSON plus a
keyed checksum.  The checksum is not a secret (the key only positions the next
page: every filter and visibility rule is applied again on every page); it makes
an edited or truncated cursor, or one from another list, a ``validation.cursor``
error (400 / exit 2) instead of a silently different page.

Adopting it for another list (rules, users, grants):

1. order the query by a unique key, e.g. ``ORDER BY id``;
2. ``limit = parse_limit(params.get("limit"))`` and
   ``after = decode_cursor("rules", params.get("cursor"), arity=1)``;
3. ``WHERE (...) AND id > ?`` with ``after`` when it is not None, ``LIMIT limit + 1``;
4. answer ``page(rows, limit, "rules", key=lambda r: (r["id"],))`` → ``(rows, next_cursor)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from portunus.errors import ValidationError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

_SALT = b"portunus.paging.v1"
_CHECK_LEN = 8
T = TypeVar("T")


def parse_limit(raw: Any, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    """``limit`` of a list request: an integer 1..``maximum``; absent means ``default``."""
    if raw is None:
        return default
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 7:
        raw = int(raw)  # the web passes query strings through
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= maximum:
        raise ValidationError(
            "validation.limit", f"limit must be an integer 1-{maximum}", field="limit"
        )
    return raw


def _check(kind: str, body: bytes) -> bytes:
    return hashlib.blake2b(
        body, key=_SALT, person=kind.encode()[:16], digest_size=_CHECK_LEN
    ).digest()


def encode_cursor(kind: str, key: Sequence[str | int | None]) -> str:
    """The opaque ``next_cursor`` after the row whose order key is ``key``."""
    body = json.dumps(list(key), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(_check(kind, body) + body).decode().rstrip("=")


def _bad(kind: str) -> ValidationError:
    return ValidationError(
        "validation.cursor",
        f"cursor is not a next_cursor of this {kind} list; start again without a cursor",
        field="cursor",
    )


def decode_cursor(kind: str, raw: Any, arity: int) -> tuple[str | int | None, ...] | None:
    """The key a cursor of list ``kind`` carries (None without a cursor); any other
    string raises ``validation.cursor``."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or len(raw) > 1024 or not raw.isascii():
        raise _bad(kind)
    try:
        blob = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise _bad(kind) from None
    check, body = blob[:_CHECK_LEN], blob[_CHECK_LEN:]
    if len(check) != _CHECK_LEN or not hmac.compare_digest(check, _check(kind, body)):
        raise _bad(kind)
    try:
        key = json.loads(body)
    except ValueError:
        raise _bad(kind) from None
    if (
        not isinstance(key, list)
        or len(key) != arity
        or not all(
            v is None or isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))
            for v in key
        )
    ):
        raise _bad(kind)
    return tuple(key)


def page(
    rows: Sequence[T], limit: int, kind: str, key: Callable[[T], Sequence[str | int | None]]
) -> tuple[list[T], str | None]:
    """Cut ``rows`` (fetched with ``LIMIT limit + 1``) to one page and its ``next_cursor``
    (None on the last page)."""
    if len(rows) <= limit:
        return list(rows), None
    kept = list(rows[:limit])
    return kept, encode_cursor(kind, key(kept[-1]))
