"""The filters and paging of ``rules.list`` (state, protocol, limit, offset): checked
here once, applied in SQL by ``store.rules.list_rules``, so a page of a long list
reads only its own rows (the Web UI's rules page, GET /v1/rules?limit=)."""

from __future__ import annotations

from typing import Any

from portunus.control.store.rules import STATES
from portunus.errors import ValidationError

RULE_STATES = STATES  # one list: "revoked" too (a revoked client's rules)
LIST_MAX = 1000


def list_filters(params: dict[str, Any]) -> dict[str, str]:
    """``state``/``protocol`` filters of ``rules.list`` (absent or empty: any)."""
    out: dict[str, str] = {}
    for key, allowed in (("state", RULE_STATES), ("protocol", ("tcp", "udp"))):
        value = params.get(key)
        if value in (None, ""):
            continue
        if value not in allowed:
            raise ValidationError(
                f"validation.{key}", f"{key} must be one of {', '.join(allowed)}", field=key
            )
        out[key] = value
    return out


def list_page(params: dict[str, Any]) -> dict[str, int]:
    """``limit``/``offset`` of ``rules.list``; with a limit the answer carries ``total``."""
    if params.get("limit") is None:
        return {}
    limit, offset = params.get("limit"), params.get("offset", 0)
    for key, value, lo, hi in (("limit", limit, 0, LIST_MAX), ("offset", offset, 0, 10**9)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValidationError(
                f"validation.{key}", f"{key} must be an integer {lo}-{hi}", field=key
            )
    return {"limit": limit, "offset": offset}
