"""The filters and paging of ``rules.list`` (state, protocol, limit, offset): checked
here once, applied in SQL by ``store.rules.list_rules``, so a page of a long list
reads only its own rows (the Web UI's rules page, GET /v1/rules?limit=)."""

from __future__ import annotations

from typing import Any, TypedDict

from portunus.control.store.rules import STATES
from portunus.errors import ValidationError

RULE_STATES = STATES  # one list: "revoked" too (a revoked client's rules)
LIST_MAX = 1000


class RuleFilters(TypedDict, total=False):
    """Keyword arguments of ``store.rules.list_rules``/``count_rules``: only the set ones."""

    state: str
    protocol: str


class RulePage(TypedDict, total=False):
    """Keyword arguments of ``store.rules.list_rules``: empty when no page was asked for."""

    limit: int
    offset: int


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


def list_page(params: dict[str, Any]) -> RulePage:
    """``limit``/``offset`` of ``rules.list``; with a limit the answer carries ``total``."""
    if params.get("limit") is None:
        return RulePage()
    return RulePage(
        limit=_int_in(params.get("limit"), "limit", LIST_MAX),
        offset=_int_in(params.get("offset", 0), "offset", 10**9),
    )


def _int_in(value: object, key: str, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise ValidationError(f"validation.{key}", f"{key} must be an integer 0-{hi}", field=key)
    return value
