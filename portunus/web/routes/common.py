"""What every /v1 handler shares: the credentials, the control client, errors, query values.

The web process holds no state and makes no decisions: it checks that a request is
well-formed, forwards the caller's bearer token as the RPC ``token`` (or the Web UI
cookie's session token as ``session``, with its verdict on the CSRF header and
Origin) and turns the control process's answer (or ``PortunusError``) into HTTP.
Control authenticates and authorizes.  Tokens are never logged.  A request with
no credential at all is answered 401 here without asking control.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from portunus.config import Settings
from portunus.control.rpc.caller import ControlCaller
from portunus.errors import PortunusError
from portunus.logs import log_event
from portunus.text import is_ascii_digits

Handler = Callable[[Request], Awaitable[Response]]
SESSION_COOKIE = "portunus_session"
CSRF_HEADER = "x-portunus-csrf"
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def error_response(err: PortunusError, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": {"code", "message", ...details}}`` with the status the code implies."""
    status = err.http_status
    hdrs = dict(headers or {})
    if status == 401:
        hdrs.setdefault("WWW-Authenticate", 'Bearer realm="portunus"')
    retry = err.details.get("retry_after")
    if status == 429 and isinstance(retry, int):
        hdrs.setdefault("Retry-After", str(retry))
    return JSONResponse({"error": err.to_dict()}, status_code=status, headers=hdrs)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What identifies the caller: a bearer token, or a session cookie plus
    whether the request passed the CSRF rule (checked by control on writes)."""

    token: str | None = None
    session: str | None = None
    csrf: bool = False

    def rpc(self) -> dict[str, Any]:
        return {"token": self.token, "session": self.session, "csrf": self.csrf}


def same_origin(request: Request) -> bool:
    """``X-Portunus-CSRF: 1`` and, when the browser sends ``Origin``, the UI's own."""
    if request.headers.get(CSRF_HEADER) != "1":
        return False
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"


def credentials(request: Request) -> Credentials:
    """Bearer token, else the session cookie; 401 before control is asked when
    there is neither.  Both are checked, in constant time, by control."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise PortunusError(
                "unauthenticated", "send an operator token as `Authorization: Bearer <token>`"
            )
        return Credentials(token=token)
    session = request.cookies.get(SESSION_COOKIE)
    if session:
        return Credentials(session=session, csrf=same_origin(request))
    raise PortunusError(
        "unauthenticated",
        "send an operator token as `Authorization: Bearer <token>` (or log in to the Web UI)",
    )


def bearer_token(request: Request) -> Credentials:
    """The caller's credentials (kept under its old name: the 401 check of a route)."""
    return credentials(request)


def control(request: Request) -> ControlCaller:
    client: ControlCaller = request.app.state.control
    return client


def settings(request: Request) -> Settings:
    value: Settings = request.app.state.settings
    return value


async def call(request: Request, method: str, params: dict[str, Any] | None = None) -> Any:
    """Forward one RPC with the caller's credentials (the 401 check comes first)."""
    creds = credentials(request)
    return await control(request).call(method, params or {}, **creds.rpc())


def query_bool(request: Request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise PortunusError(
        "validation.query", f"?{name}= must be true or false, got {raw!r}", field=name
    )


def query_number(
    request: Request,
    name: str,
    lo: float,
    hi: float,
    *,
    integer: bool = False,
    open_lo: bool = False,
) -> float | int | None:
    """A numeric query parameter within ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value: float | int = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise PortunusError(
            "validation.query", f"?{name}= must be {kind}, got {raw!r}", field=name
        ) from None
    low_ok = value > lo if open_lo else value >= lo
    if not low_ok or value > hi or value != value:  # NaN compares false everywhere
        bracket = "(" if open_lo else "["
        raise PortunusError(
            "validation.query",
            f"?{name}= must be within {bracket}{lo:g}, {hi:g}], got {raw}",
            field=name,
        )
    return value


def rule_id(request: Request) -> int:
    """The ``{id}`` path segment; a non-number can name no rule."""
    raw = request.path_params["id"]
    if not is_ascii_digits(raw) or len(raw) > 18 or int(raw) < 1:
        raise PortunusError(
            "rule_not_found", f"rule {raw!r} not found (rule ids are positive numbers)", id=raw
        )
    return int(raw)


def endpoint(fn: Handler) -> Handler:
    """Turn a handler's PortunusError into the envelope; log (never leak) anything else."""

    @functools.wraps(fn)
    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except PortunusError as err:
            if err.http_status >= 500:
                log_event(
                    "web.request_failed",
                    level="warning",
                    method=request.method,
                    path=request.url.path,
                    code=err.code,
                    message=err.message,
                )
            return error_response(err)
        except Exception as exc:  # noqa: BLE001 - one broken request must not reach uvicorn's logger
            log_event(
                "web.internal_error",
                level="error",
                method=request.method,
                path=request.url.path,
                error=repr(exc),
                traceback=traceback.format_exc(),
            )
            return error_response(
                PortunusError("internal", "internal error; see the web process log")
            )

    return wrapper


def route(path: str, **handlers: Handler) -> Route:
    """One Route per path with a handler per method (``GET=..., PUT=...``), so a
    405 names every allowed method in ``Allow``, not just one route's."""
    table = {method.upper(): fn for method, fn in handlers.items()}
    if "GET" in table:
        table.setdefault("HEAD", table["GET"])

    async def dispatch(request: Request) -> Response:
        return await table[request.method](request)

    dispatch.__name__ = "_".join(fn.__name__ for fn in handlers.values())
    return Route(path, dispatch, methods=list(table))
