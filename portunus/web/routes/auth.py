"""/v1/auth/* and /v1/users/me: Web UI login sessions and first-run setup.

The session token travels once from control to here and on to the browser as
the ``portunus_session`` cookie (HttpOnly, SameSite=Strict, Path=/, Secure over
https); it is never in a response body.  Every later request hands the cookie
back to control, which authenticates it like a bearer token.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from portunus.errors import PortunusError
from portunus.web.routes.bodies import read_json
from portunus.web.routes.common import (
    SESSION_COOKIE,
    bearer_token,
    call,
    control,
    endpoint,
    error_response,
    route,
)

SESSION_MAX_AGE = 7 * 24 * 3600


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def session_cookie(request: Request, token: str, max_age: int = SESSION_MAX_AGE) -> str:
    flags = f"{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}"
    return flags + ("; Secure" if _secure(request) else "")


def _source(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _with_cookie(request: Request, answer: dict[str, Any], status: int) -> Response:
    token = str(answer.pop("session_token"))
    body = {
        k: answer[k]
        for k in ("user_id", "display_name", "role", "password_change_required")
        if k in answer
    }
    response = JSONResponse(body, status_code=status)
    response.headers.append(
        "Set-Cookie",
        session_cookie(request, token, int(answer.get("max_age_secs", SESSION_MAX_AGE))),
    )
    return response


@endpoint
async def login(request: Request) -> Response:
    body = await read_json(request, "LoginBody")
    answer = await control(request).call("auth.login", {**body, "source": _source(request)})
    return _with_cookie(request, answer, 200)


@endpoint
async def setup(request: Request) -> Response:
    body = await read_json(request, "SetupBody")
    answer = await control(request).call("auth.setup", {**body, "source": _source(request)})
    return _with_cookie(request, answer, 201)


@endpoint
async def logout(request: Request) -> Response:
    """A session that is already gone (expired, revoked) still gets its cookie
    cleared, with the 401 that says so."""
    try:
        await call(request, "auth.logout")
    except PortunusError as err:
        if err.code != "unauthenticated":
            raise
        response: Response = error_response(err)
    else:
        response = Response(status_code=204)
    response.headers.append("Set-Cookie", session_cookie(request, "", 0))
    return response


@endpoint
async def me(request: Request) -> Response:
    return JSONResponse(await call(request, "users.me"))


@endpoint
async def change_my_password(request: Request) -> Response:
    bearer_token(request)  # 401 before looking at the body
    call_args = await read_json(request, "OwnPasswordBody")
    await call(request, "users.me.password", call_args)
    return Response(status_code=204)


routes = [
    route("/v1/auth/login", POST=login),
    route("/v1/auth/logout", POST=logout),
    route("/v1/auth/setup", POST=setup),
    route("/v1/users/me", GET=me),
    route("/v1/users/me/password", POST=change_my_password),
]
