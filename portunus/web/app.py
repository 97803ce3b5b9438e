"""The operator HTTP app: ``/v1/*`` mapped one-to-one onto the control socket RPC,
and the Web UI's pages (``portunus.web.ui``) on the same origin.

``create_app`` runs in the web process (``portunus.web.main``) and in tests, where
``settings.socket_path`` points at a fake control server.  Everything the app needs
lives on ``app.state``: ``settings``, ``control`` (a ``ControlCaller`` without a token
of its own: every call carries the caller's), ``stopping`` (set on shutdown so SSE
streams end instead of holding uvicorn's graceful shutdown) and ``openapi``.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from portunus import __version__
from portunus.config import Settings
from portunus.control.rpc.caller import ControlCaller
from portunus.errors import PortunusError
from portunus.web.limits import BodyLimit
from portunus.web.openapi import build_openapi
from portunus.web.routes import audit, auth, clients, owners, rules, system, traffic, users
from portunus.web.routes.common import error_response
from portunus.web.ui import ui_routes
from portunus.web.ui.render import render
from portunus.web.ui.security import SecurityHeaders

# Control answers rules.push only after the client acknowledged (or ack_timeout
# passed); allow for the longest ack_timeout a request may ask for.
CONTROL_TIMEOUT = 75.0


def api_routes() -> list[BaseRoute]:
    # auth first: /v1/users/me must win over /v1/users/{id}.
    return [
        *auth.routes,
        *rules.routes,
        *clients.routes,
        *owners.routes,
        *users.routes,
        *audit.routes,
        *traffic.routes,
        *system.routes,
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    """Router-level 404/405 in the same envelope as every other error."""
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    err = PortunusError(
        "not_found", f"no such endpoint: {where}; the API is described at /v1/openapi.json"
    )
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = ", ".join(
            sorted(m.strip() for m in headers.get("Allow", "").split(",") if m.strip())
        )
        headers["Allow"] = allowed
        err = PortunusError(
            "method_not_allowed", f"{where} is not allowed; allowed: {allowed}", allowed=allowed
        )
    elif exc.status_code != 404:
        err = PortunusError("bad_request", exc.detail)
    if not request.url.path.startswith("/v1/") and "text/html" in request.headers.get("accept", ""):
        # a browser on a page URL that does not exist: a page, not a JSON envelope
        page = render(request, "error.html", status=exc.status_code, error=err, ident=None)
        page.headers.update(headers)
        return page
    response = error_response(err, headers=headers)
    response.status_code = exc.status_code
    return response


def create_app(settings: Settings, control: ControlCaller | None = None) -> Starlette:
    """Build the API app; ``control`` defaults to a client of ``settings.socket_path``."""
    app = Starlette(
        routes=[*api_routes(), *ui_routes()],
        exception_handlers={HTTPException: _http_error},
        middleware=[Middleware(SecurityHeaders), Middleware(BodyLimit)],
    )
    app.state.settings = settings
    app.state.control = control or ControlCaller(
        settings.socket_path, None, timeout=CONTROL_TIMEOUT
    )
    app.state.stopping = asyncio.Event()
    app.state.openapi = build_openapi(__version__)
    return app
