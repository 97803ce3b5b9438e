"""/v1/users, /v1/tokens and /v1/grants: accounts, per-user API tokens and
grants (one RPC each; control decides who may do what)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from portunus.web.routes.bodies import read_json
from portunus.web.routes.common import bearer_token, call, endpoint, route
from portunus.web.routes.list_query import list_params


def _id(request: Request) -> str:
    return str(request.path_params["id"])


@endpoint
async def add_user(request: Request) -> Response:
    bearer_token(request)  # 401 before looking at the body
    body = await read_json(request, "UserBody")
    return JSONResponse(await call(request, "users.add", body), status_code=201)


@endpoint
async def list_users(request: Request) -> Response:
    """One page (``?limit=&cursor=&role=&name_prefix=``), by user id."""
    return JSONResponse(
        await call(request, "users.list", list_params(request, "role", "name_prefix"))
    )


@endpoint
async def get_user(request: Request) -> Response:
    return JSONResponse(await call(request, "users.get", {"user_id": _id(request)}))


@endpoint
async def remove_user(request: Request) -> Response:
    return JSONResponse(await call(request, "users.remove", {"user_id": _id(request)}))


@endpoint
async def set_password(request: Request) -> Response:
    bearer_token(request)
    body = await read_json(request, "PasswordBody")
    return JSONResponse(await call(request, "users.passwd", {**body, "user_id": _id(request)}))


@endpoint
async def issue_token(request: Request) -> Response:
    bearer_token(request)
    body = await read_json(request, "TokenBody")
    return JSONResponse(
        await call(request, "tokens.issue", {**body, "user_id": _id(request)}), status_code=201
    )


@endpoint
async def list_tokens(request: Request) -> Response:
    """One page (``?limit=&cursor=``) of the user's tokens, by token id."""
    return JSONResponse(
        await call(request, "tokens.list", {**list_params(request), "user_id": _id(request)})
    )


@endpoint
async def revoke_token(request: Request) -> Response:
    await call(request, "tokens.revoke", {"token_id": _id(request)})
    return Response(status_code=204)


@endpoint
async def add_grant(request: Request) -> Response:
    bearer_token(request)
    body = await read_json(request, "GrantBody")
    return JSONResponse(await call(request, "grants.add", body), status_code=201)


@endpoint
async def list_grants(request: Request) -> Response:
    """One page (``?limit=&cursor=&user=&client=``), by grant id."""
    params = list_params(request, "user", "client", rename={"user": "user_id"})
    return JSONResponse(await call(request, "grants.list", params))


@endpoint
async def revoke_grant(request: Request) -> Response:
    return JSONResponse(await call(request, "grants.revoke", {"grant_id": _id(request)}))


routes = [
    route("/v1/users", GET=list_users, POST=add_user),
    route("/v1/users/{id}", GET=get_user, DELETE=remove_user),
    route("/v1/users/{id}/password", POST=set_password),
    route("/v1/users/{id}/tokens", GET=list_tokens, POST=issue_token),
    route("/v1/tokens/{id}", DELETE=revoke_token),
    route("/v1/grants", GET=list_grants, POST=add_grant),
    route("/v1/grants/{id}", DELETE=revoke_grant),
]
