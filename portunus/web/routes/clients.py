"""/v1/clients and /v1/client-enrollments: enrolled clients, their connection
state, and enroll / rename / revoke / delete (one RPC each)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from portunus.control.store.paging import MAX_LIMIT
from portunus.web.routes.bodies import read_json
from portunus.web.routes.common import bearer_token, call, endpoint, query_bool, query_number, route


def client_ref(request: Request) -> str:
    """The ``{id}`` path segment: a client id or name."""
    return str(request.path_params["id"])


@endpoint
async def list_clients(request: Request) -> Response:
    """One page (``?limit=&cursor=&connected=&name_prefix=``); the control process
    validates the cursor and the prefix, so the CLI and the API agree."""
    bearer_token(request)
    params: dict[str, Any] = {
        k: request.query_params[k] for k in ("cursor", "name_prefix") if request.query_params.get(k)
    }
    limit = query_number(request, "limit", 1, MAX_LIMIT, integer=True)
    if limit is not None:
        params["limit"] = limit
    connected = query_bool(request, "connected")
    if connected is not None:
        params["connected"] = connected
    return JSONResponse(await call(request, "clients.list", params))


@endpoint
async def get_client(request: Request) -> Response:
    return JSONResponse(await call(request, "clients.get", {"id": client_ref(request)}))


@endpoint
async def enroll_client(request: Request) -> Response:
    bearer_token(request)  # 401 before looking at the body
    body: dict[str, Any] = await read_json(request, "ClientEnrollmentBody")
    return JSONResponse(await call(request, "clients.enroll", body), status_code=201)


@endpoint
async def rename_client(request: Request) -> Response:
    bearer_token(request)
    body = await read_json(request, "ClientRename")
    return JSONResponse(
        await call(request, "clients.rename", {"id": client_ref(request), "name": body["name"]})
    )


@endpoint
async def revoke_client(request: Request) -> Response:
    return JSONResponse(await call(request, "clients.revoke", {"id": client_ref(request)}))


@endpoint
async def delete_client(request: Request) -> Response:
    await call(request, "clients.delete", {"id": client_ref(request)})
    return Response(status_code=204)


routes = [
    route("/v1/clients", GET=list_clients),
    route("/v1/client-enrollments", POST=enroll_client),
    route("/v1/clients/{id}", GET=get_client, DELETE=delete_client),
    route("/v1/clients/{id}/name", PATCH=rename_client),
    route("/v1/clients/{id}/revoke", POST=revoke_client),
]
