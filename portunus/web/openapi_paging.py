"""OpenAPI pieces every paged list shares: the ``?limit=&cursor=`` parameters and
the ``next_cursor``/``total`` fields of the answer (store.paging, docs/fleet.md).
Kept apart so each list's path and schema say "paged" in one line."""

from __future__ import annotations

from typing import Any

from portunus.web.openapi_common import _q

PAGE_PARAMS: list[dict[str, Any]] = [
    _q(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
        "Page size",
    ),
    _q(
        "cursor",
        {"type": "string", "maxLength": 1024},
        "next_cursor of the previous page (an edited or foreign cursor: 400 validation.cursor)",
    ),
]


def page_fields(what: str) -> dict[str, Any]:
    """``next_cursor`` and ``total`` of a list answer of ``what`` (e.g. "Rules")."""
    return {
        "next_cursor": {
            "type": ["string", "null"],
            "description": "Pass as ?cursor= for the next page; null on the last",
        },
        "total": {"type": "integer", "description": f"{what} matching the filters, all pages"},
    }
