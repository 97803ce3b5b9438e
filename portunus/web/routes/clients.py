"""/v1/clients: enrolled clients and whether they are connected."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from portunus.web.routes.common import call, endpoint, route


@endpoint
async def list_clients(request: Request) -> Response:
    return JSONResponse(await call(request, "clients.list"))


routes = [route("/v1/clients", GET=list_clients)]
