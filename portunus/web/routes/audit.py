"""/v1/audit: the operator audit trail, newest first, paged by an opaque cursor."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from portunus.web.routes.common import bearer_token, call, endpoint, query_number, route

MAX_LIMIT = 1000


@endpoint
async def list_audit(request: Request) -> Response:
    """``since``/``until`` are passed through as given: the control process owns
    their parsing, so the CLI and the API accept the same time formats."""
    bearer_token(request)
    # Present but empty (``?until=``) is passed on too: control refuses it (400)
    # rather than the page silently ignoring the filter.  actor/outcome are
    # optional narrowing filters: empty means "any".
    params: dict[str, Any] = {
        k: request.query_params[k]
        for k in ("since", "until", "cursor")
        if k in request.query_params
    }
    params.update(
        {k: request.query_params[k] for k in ("actor", "outcome") if request.query_params.get(k)}
    )
    limit = query_number(request, "limit", 1, MAX_LIMIT, integer=True)
    if limit is not None:
        params["limit"] = limit
    return JSONResponse(await call(request, "audit.list", params))


routes = [route("/v1/audit", GET=list_audit)]
