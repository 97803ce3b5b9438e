"""/v1/traffic: the stored traffic history (``traffic.query``), and the summary the
dashboard shows (``traffic.summary``: throughput now, top rules by bytes)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from portunus.web.routes.common import call, endpoint, query_number, route

QUERY_KEYS = ("rule", "client", "owner", "from", "to", "resolution")


@endpoint
async def traffic_history(request: Request) -> Response:
    """Query values go to control as given: it owns the time parsing, as for /v1/audit."""
    params: dict[str, Any] = {
        k: request.query_params[k] for k in QUERY_KEYS if request.query_params.get(k)
    }
    return JSONResponse(await call(request, "traffic.query", params))


@endpoint
async def traffic_summary(request: Request) -> Response:
    params: dict[str, Any] = {
        k: request.query_params[k] for k in ("owner", "since") if request.query_params.get(k)
    }
    limit = query_number(request, "limit", 0, 50, integer=True)
    if limit is not None:
        params["limit"] = limit
    return JSONResponse(await call(request, "traffic.summary", params))


routes = [
    route("/v1/traffic", GET=traffic_history),
    route("/v1/traffic/summary", GET=traffic_summary),
]
