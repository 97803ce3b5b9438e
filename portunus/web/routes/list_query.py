"""The query string of a paged list route (``?limit=&cursor=`` and its filters) as
the params of its RPC.  The control process checks the cursor and every filter,
so the HTTP API, the CLI and the Web UI answer alike; here only ``limit`` is
parsed (a query string carries text)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from portunus.bounds import LIST_LIMIT
from portunus.web.routes.common import query_number


def list_params(
    request: Request, *filters: str, rename: dict[str, str] | None = None
) -> dict[str, Any]:
    """``cursor`` and the non-empty ``filters`` as given (``rename`` maps a query name
    to its RPC name), plus ``limit`` as an integer 1..1000 (else 400 validation.query)."""
    names = rename or {}
    params: dict[str, Any] = {
        names.get(k, k): request.query_params[k]
        for k in ("cursor", *filters)
        if request.query_params.get(k)
    }
    limit = query_number(request, "limit", LIST_LIMIT.lo, LIST_LIMIT.hi, integer=True)
    if limit is not None:
        params["limit"] = limit
    return params
