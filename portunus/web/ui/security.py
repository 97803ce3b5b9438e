"""Security headers on every response of the operator HTTP listener (pages and
/v1 alike), and the CSRF check of the Web UI's own form posts.

The CSP allows scripts and styles from this origin only: no inline script, no
inline style, nothing from elsewhere.  Pages and the API share one origin, so
``connect-src 'self'`` covers the live stats stream and ``frame-ancestors 'none'``
(with X-Frame-Options for older browsers) stops clickjacking.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from portunus.errors import PortunusError
from portunus.web.routes.common import same_origin

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Pure ASGI middleware (no body buffering, so SSE streams stay streams)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *((k, v) for k, v in HEADERS if k not in present),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def check_csrf(request: Request) -> None:
    """A form post from the browser needs ``X-Portunus-CSRF: 1`` (a cross-site form
    cannot set a custom header) and, when the browser says where it comes from,
    this very origin: the same rule (``same_origin``) as the API's cookie writes."""
    if not same_origin(request):
        raise PortunusError(
            "csrf_failed",
            "this form must be sent by the Portunus page itself "
            "(X-Portunus-CSRF header and same Origin); reload the page and try again",
        )
