"""/v1/clients/{id}/owners: per-owner caps on a client (one RPC each)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from portunus.web.routes.bodies import read_json
from portunus.web.routes.clients import client_ref
from portunus.web.routes.common import bearer_token, call, endpoint, route


def _params(request: Request) -> dict[str, str]:
    return {"client": client_ref(request), "owner": str(request.path_params["owner"])}


@endpoint
async def list_owners(request: Request) -> Response:
    return JSONResponse(await call(request, "owner_caps.list", {"client": client_ref(request)}))


@endpoint
async def get_owner_cap(request: Request) -> Response:
    return JSONResponse(await call(request, "owner_caps.get", _params(request)))


@endpoint
async def put_owner_cap(request: Request) -> Response:
    bearer_token(request)  # 401 before looking at the body
    caps = await read_json(request, "OwnerCaps")
    return JSONResponse(
        await call(request, "owner_caps.set", {**_params(request), "rate_limit": caps})
    )


@endpoint
async def delete_owner_cap(request: Request) -> Response:
    await call(request, "owner_caps.delete", _params(request))
    return Response(status_code=204)


routes = [
    route("/v1/clients/{id}/owners", GET=list_owners),
    route(
        "/v1/clients/{id}/owners/{owner}/rate-limit",
        GET=get_owner_cap,
        PUT=put_owner_cap,
        DELETE=delete_owner_cap,
    ),
]
