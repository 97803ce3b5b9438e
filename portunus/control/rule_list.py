"""The filters and paging of ``rules.list`` (client, owner, state, protocol; limit,
cursor): checked here once, applied in SQL by ``store.rules.list_rules``, so a page
of a long list reads only its own rows and its ``total`` is an index count.

Rules are listed by id.  Ids are never reused and only grow, so a rule pushed
while someone pages lands after every page already read; a page is keyset
(``store.paging``): "the next ``limit`` rules with an id above the cursor's".
"""

from __future__ import annotations

from typing import Any, TypedDict

from portunus.control.store.paging import decode_cursor, parse_limit
from portunus.control.store.rules import STATES
from portunus.errors import ValidationError, reject_unknown_fields

RULE_STATES = STATES  # one list: "revoked" too (a revoked client's rules)
KIND = "rules"
PARAMS = ("client", "owner", "state", "protocol", "limit", "cursor")


class RuleFilters(TypedDict, total=False):
    """Keyword arguments of ``store.rules.list_rules``/``count_rules``: only the set ones."""

    state: str
    protocol: str


def list_filters(params: dict[str, Any]) -> RuleFilters:
    """``state``/``protocol`` filters of ``rules.list`` (absent or empty: any)."""
    out = RuleFilters()
    state = _one_of(params, "state", RULE_STATES)
    if state is not None:
        out["state"] = state
    protocol = _one_of(params, "protocol", ("tcp", "udp"))
    if protocol is not None:
        out["protocol"] = protocol
    return out


def _one_of(params: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str | None:
    value = params.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str) or value not in allowed:
        raise ValidationError(
            f"validation.{key}", f"{key} must be one of {', '.join(allowed)}", field=key
        )
    return value


def list_page(params: dict[str, Any]) -> tuple[int, int | None]:
    """(``limit``, id after which the page starts or None) of ``rules.list``.

    ``offset`` paging is gone: it repeated or skipped rules pushed or removed while
    someone paged, and cost a scan of every row before the page.  It is refused
    with a pointer to ``cursor`` rather than ignored (ignoring it would silently
    answer the first page again)."""
    if "offset" in params:
        raise ValidationError(
            "validation.offset",
            "offset is not supported: pass the previous answer's next_cursor as cursor",
            field="offset",
        )
    reject_unknown_fields(params, PARAMS)
    limit = parse_limit(params.get("limit"))
    key = decode_cursor(KIND, params.get("cursor"), arity=1)
    if key is None:
        return limit, None
    after = key[0]
    if not isinstance(after, int) or after < 0:
        raise ValidationError(
            "validation.cursor",
            "cursor is not a next_cursor of this rules list; start again without a cursor",
            field="cursor",
        )
    return limit, after
