"""What every page shares: who is asking, the page/action wrappers, form bodies.

Pages hold no logic of their own: each one calls the same control RPC as its /v1
twin through ``portunus.web.routes.common.call`` (the caller's credential, the same
``PortunusError`` codes), and renders the answer.  ``page_identity`` is the one
place that knows how a browser proves who it is.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from portunus.errors import PortunusError
from portunus.logs import log_event
from portunus.web.routes.bodies import read_body
from portunus.web.routes.common import call
from portunus.web.ui.render import render
from portunus.web.ui.security import check_csrf

PageHandler = Callable[[Request, "Identity"], Awaitable[Response]]
FORM_LIMIT = 64 * 1024
PASSWORD_PAGE = "/account/password"


@dataclass(frozen=True, slots=True)
class Identity:
    """The signed-in caller as the control process sees them."""

    user: str
    role: str
    display_name: str = ""
    password_change_required: bool = False

    @property
    def is_superadmin(self) -> bool:
        return self.role == "superadmin"


async def page_identity(request: Request) -> Identity:
    """Who the browser is (session cookie, or a bearer token for tools); raises
    ``unauthenticated`` when it cannot say."""
    me = await call(request, "users.me")
    ident = Identity(
        str(me.get("user_id", "")),
        str(me.get("role", "")),
        str(me.get("display_name") or ""),
        bool(me.get("password_change_required")),
    )
    request.state.ident = ident
    return ident


def error_page(request: Request, err: PortunusError) -> Response:
    template = "permission.html" if err.http_status == 403 else "error.html"
    return render(request, template, status=err.http_status, error=err)


def _wrap(fn: PageHandler, *, superadmin: bool) -> Callable[[Request], Awaitable[Response]]:
    @functools.wraps(fn)
    async def wrapper(request: Request) -> Response:
        try:
            if request.method == "POST":
                check_csrf(request)
            ident = await page_identity(request)
            if ident.password_change_required and request.url.path != PASSWORD_PAGE:
                # control refuses everything else too (password_change_required): say it once, here
                return RedirectResponse(PASSWORD_PAGE, status_code=303)
            if superadmin and not ident.is_superadmin:
                raise PortunusError(
                    "role_required", "this page is for superadmins only", role_required="superadmin"
                )
            return await fn(request, ident)
        except PortunusError as err:
            if err.code == "unauthenticated":
                target = request.url.path if request.method == "GET" else "/"
                return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)
            return error_page(request, err)
        except Exception as exc:  # noqa: BLE001 - one broken page must not reach uvicorn's logger
            log_event(
                "web.ui_error",
                level="error",
                path=request.url.path,
                error=repr(exc),
                traceback=traceback.format_exc(),
            )
            return error_page(
                request, PortunusError("internal", "internal error; see the web process log")
            )

    return wrapper


def page(fn: PageHandler) -> Callable[[Request], Awaitable[Response]]:
    """A page (or form action) any signed-in user may open."""
    return _wrap(fn, superadmin=False)


def superadmin_page(fn: PageHandler) -> Callable[[Request], Awaitable[Response]]:
    """A superadmin-only page: a user typing its URL gets the permission page."""
    return _wrap(fn, superadmin=True)


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form body (what app.js sends); repeated keys keep the last value
    except ``name[]`` style lists, which the callers read through ``form_list``."""
    raw = await read_body(request, FORM_LIMIT)
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=500)
    except (UnicodeDecodeError, ValueError):
        raise PortunusError("validation.body", "the form could not be read") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        out[key] = value.strip()
    return out


def field_errors(err: PortunusError) -> dict[str, str]:
    """``field -> message`` from an API error, for messages next to the inputs."""
    out: dict[str, str] = {}
    for problem in err.details.get("errors") or []:
        if isinstance(problem, dict) and problem.get("field"):
            out.setdefault(str(problem["field"]), str(problem.get("message", "")))
    field = err.details.get("field")
    if isinstance(field, str):
        out.setdefault(field, err.message)
    return out


def redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303)


def query_dict(request: Request, keys: tuple[str, ...]) -> dict[str, Any]:
    return {
        k: request.query_params[k].strip() for k in keys if request.query_params.get(k, "").strip()
    }
