"""Signing in and out, first-run setup, and the caller's own password.

The session token goes from control to the browser only as the HttpOnly cookie
(the same ``session_cookie`` as POST /v1/auth/login); it never appears in a page.
Login and setup are the two pages without an identity; they still require the
CSRF header on their posts, so a cross-site form cannot log a browser in.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from portunus.errors import PortunusError
from portunus.web.routes.auth import session_cookie
from portunus.web.routes.bodies import validate_body
from portunus.web.routes.common import call, control
from portunus.web.ui.base import PASSWORD_PAGE, Identity, field_errors, page, read_form, redirect
from portunus.web.ui.render import render
from portunus.web.ui.security import check_csrf


def safe_next(value: str | None) -> str:
    """Only a path on this site: ``//evil.example`` or ``https://…`` would be an open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _source(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _signed_in(request: Request, answer: dict[str, Any], target: str) -> Response:
    if answer.get("password_change_required"):
        target = PASSWORD_PAGE
    response = RedirectResponse(target, status_code=303)
    response.headers.append(
        "Set-Cookie",
        session_cookie(
            request, str(answer["session_token"]), int(answer.get("max_age_secs") or 7 * 86400)
        ),
    )
    return response


async def login_page(request: Request) -> Response:
    values = {"next": safe_next(request.query_params.get("next"))}
    return render(
        request,
        "login.html",
        values=values,
        errors={},
        error=None,
        ident=None,
        notice=request.query_params.get("notice"),
    )


async def login(request: Request) -> Response:
    form = await read_form(request)
    values = {"user_id": form.get("user_id", ""), "next": safe_next(form.get("next"))}
    try:
        check_csrf(request)
        body = validate_body(
            {"user_id": form.get("user_id", ""), "password": form.get("password", "")}, "LoginBody"
        )
        answer = await control(request).call("auth.login", {**body, "source": _source(request)})
    except PortunusError as err:
        headers = (
            {"Retry-After": str(err.details["retry_after"])}
            if "retry_after" in err.details
            else None
        )
        return render(
            request,
            "login.html",
            status=err.http_status,
            values=values,
            errors=field_errors(err),
            error=err,
            ident=None,
            notice=None,
            headers=headers,
        )
    return _signed_in(request, answer, values["next"])


@page
async def logout(request: Request, ident: Identity) -> Response:
    try:
        await call(request, "auth.logout")
    except PortunusError as err:
        if err.code != "unauthenticated":
            raise
    response = RedirectResponse("/login?notice=signed-out", status_code=303)
    response.headers.append("Set-Cookie", session_cookie(request, "", 0))
    return response


async def setup_page(request: Request) -> Response:
    token = request.query_params.get("token", "")
    return render(
        request,
        "setup.html",
        values={"token": token, "user_id": "admin"},
        errors={},
        error=None,
        ident=None,
        missing=not token,
    )


async def setup(request: Request) -> Response:
    form = await read_form(request)
    values = {k: form.get(k, "") for k in ("token", "user_id", "display_name")}
    try:
        check_csrf(request)
        if form.get("password", "") != form.get("confirm", ""):
            raise PortunusError(
                "validation.password_mismatch", "the two passwords differ", field="confirm"
            )
        body: dict[str, Any] = {
            k: form[k] for k in ("token", "user_id", "password", "display_name") if form.get(k)
        }
        body = validate_body(body, "SetupBody")
        answer = await control(request).call("auth.setup", {**body, "source": _source(request)})
    except PortunusError as err:
        return render(
            request,
            "setup.html",
            status=err.http_status,
            values=values,
            errors=field_errors(err),
            error=err,
            ident=None,
            missing=False,
        )
    return _signed_in(request, answer, "/")


@page
async def password_page(request: Request, ident: Identity) -> Response:
    return render(
        request, "password.html", errors={}, error=None, forced=ident.password_change_required
    )


@page
async def change_password(request: Request, ident: Identity) -> Response:
    form = await read_form(request)
    try:
        if form.get("new_password", "") != form.get("confirm", ""):
            raise PortunusError(
                "validation.password_mismatch", "the two new passwords differ", field="confirm"
            )
        body = validate_body(
            {k: form.get(k, "") for k in ("current_password", "new_password")}, "OwnPasswordBody"
        )
        await call(request, "users.me.password", body)
    except PortunusError as err:
        if not err.code.startswith("validation"):
            raise
        return render(
            request,
            "password.html",
            status=err.http_status,
            errors=field_errors(err),
            error=err,
            forced=ident.password_change_required,
        )
    return redirect("/?notice=password")


routes = [
    Route("/login", login_page, methods=["GET", "HEAD"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/setup", setup_page, methods=["GET", "HEAD"]),
    Route("/setup", setup, methods=["POST"]),
    Route(PASSWORD_PAGE, password_page, methods=["GET", "HEAD"]),
    Route(PASSWORD_PAGE, change_password, methods=["POST"]),
]
