"""What one HTTP peer may cost the web process before it proves anything.

The API listener may be exposed (``operator_http_listen``), and a request is
read before its token is checked, so the limits hold for anonymous peers:

- **Headers**: at most ``MAX_HEADER_BYTES`` (h11's bound on an incomplete event:
  request line plus headers); over it, 400 in the error envelope.
- **Body**: at most ``MAX_BODY`` bytes (``routes.bodies``), enforced by
  ``BodyLimit`` for every route: at once on a larger ``Content-Length``, else
  while the body streams in; 413 ``validation.body_too_large``.
- **Slow requests**: a request must be complete, headers and body, within
  ``http_request_timeout_secs`` (default ``REQUEST_TIMEOUT_SECS``) of the
  connection opening or of the previous response; else 408 ``request_timeout``
  (or just a close once a response started) -- a peer cannot hold a connection
  by trickling bytes.  An idle keep-alive connection is closed after
  ``KEEP_ALIVE_SECS``.
- **Connections**: at most ``http_max_connections`` (default
  ``MAX_CONNECTIONS``) per listener.  One more first reclaims the connection
  that has waited longest for a complete request (a slow or idle peer; it gets
  503 ``unavailable`` and a close), as nginx reuses its idle connections when it
  runs out: slow peers, however many, cannot lock out a client whose request
  arrives at once.  Only when every connection is busy with a request does the
  new one get an immediate 503 ``unavailable`` and a close, before anything is
  parsed.

uvicorn has no request deadline and its ``limit_concurrency`` answers only once
a request arrived (in plain text), hence ``GuardedH11Protocol``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from portunus.errors import PortunusError
from portunus.logs import log_throttled
from portunus.text import is_ascii_digits
from portunus.web.routes.bodies import MAX_BODY, BodyTooLarge
from portunus.web.routes.common import error_response

MAX_HEADER_BYTES = 16 * 1024
REQUEST_TIMEOUT_SECS = 10.0
KEEP_ALIVE_SECS = 5
MAX_CONNECTIONS = 256

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def raw_error(status: int, err: PortunusError) -> bytes:
    """A complete ``Connection: close`` response in the error envelope, for the
    places that answer below the ASGI app (no h11 state to keep)."""
    body = json.dumps({"error": err.to_dict()}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a request deadline.

    ``waiting`` holds, oldest first, the connections whose deadline runs (no
    complete request yet): the ones the cap may reclaim.  Each subclass (one per
    listener, ``guarded_protocol``) has its own.
    """

    max_connections = MAX_CONNECTIONS
    request_timeout = REQUEST_TIMEOUT_SECS
    waiting: dict[GuardedH11Protocol, None] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.waiting = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    # A stream server always hands its protocol an asyncio.Transport; uvicorn's
    # H11Protocol narrows the BaseProtocol signature the same way (and ignores it too).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        over = len(self.connections) >= self.max_connections and not self._reclaim()
        super().connection_made(transport)
        if over:
            transport.write(
                raw_error(
                    503,
                    PortunusError(
                        "unavailable",
                        f"too many open connections (at most {self.max_connections}); retry shortly",
                    ),
                )
            )
            transport.close()
            log_throttled(
                "web.connection_refused",
                level="warning",
                limit=self.max_connections,
                server=_where(self.server),
            )
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the request is complete (or the connection is over)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Next request on a kept-alive connection: the clock starts again (a
        # pipelined one that is already complete needs none).
        if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (e.g. headers over ``MAX_HEADER_BYTES``),
        answered in the envelope instead of uvicorn's plain text."""
        self.transport.write(
            raw_error(
                400,
                PortunusError(
                    "bad_request", f"{msg} (headers are limited to {MAX_HEADER_BYTES} bytes)"
                ),
            )
        )
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expired)
        self.waiting[self] = None

    def _disarm(self) -> None:
        self.waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _reclaim(self) -> bool:
        """Close the connection that has waited longest for a complete request,
        to make room for a new one; False when every connection is busy."""
        while self.waiting:
            victim = next(iter(self.waiting))
            if victim._cut(
                503,
                PortunusError(
                    "unavailable",
                    f"the server reached its {self.max_connections} connections and closed "
                    "this one, which had not sent a complete request; retry",
                ),
            ):
                log_throttled(
                    "web.connection_reclaimed",
                    level="warning",
                    limit=self.max_connections,
                    server=_where(self.server),
                )
                return True
        return False

    def _expired(self) -> None:
        if self._cut(
            408,
            PortunusError(
                "request_timeout",
                f"the request was not complete within {self.request_timeout:g} s",
            ),
        ):
            log_throttled(
                "web.request_timeout",
                level="warning",
                peer=_where(self.client),
                timeout_secs=self.request_timeout,
            )

    def _cut(self, status: int, err: PortunusError) -> bool:
        """Close a connection whose request is not complete: ``err`` in the
        envelope unless a response started (then only the close)."""
        self._disarm()
        if self.transport.is_closing():
            return False
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(raw_error(status, err))
        self.transport.close()
        return True


def guarded_protocol(max_connections: int, request_timeout: float) -> type[GuardedH11Protocol]:
    """A ``GuardedH11Protocol`` for one listener, with its own limits and registry."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"max_connections": max_connections, "request_timeout": request_timeout},
    )


def _where(addr: tuple[str, int | None] | None) -> str | None:
    return f"{addr[0]}:{addr[1]}" if addr else None


class BodyLimit:
    """ASGI middleware: no route sees more than ``limit`` bytes of body."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if (
            declared is not None
            and is_ascii_digits(declared.decode("latin-1"))
            and int(declared) > self.limit
        ):
            await self._too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge()
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if started:
                raise
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Connection: close -- the rest of the body is never read.
        response = error_response(BodyTooLarge(), headers={"connection": "close"})
        await response(scope, receive, send)
