"""The edge gateway: TLS on ``control_listen`` (control process).

A fresh connection's first frame decides what it is (docs/edge.md): ``enroll``
redeems a one-time code for a token and the connection closes; ``hello``
authenticates a client by its token and becomes that client's session until
either side closes it.  Everything after the hello is ``EdgeSession`` and
``RemoteLink``'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

from portunus.control.edge.enrollment import EnrollmentInvalid, client_for_token, redeem
from portunus.control.edge.remote_link import RemoteLink
from portunus.control.edge.session import DEAD_AFTER_SECS, HEARTBEAT_SECS, EdgeSession
from portunus.control.store import Store, utc_now, write_audit
from portunus.edge.wire import WireError, encode_frame, read_frame
from portunus.logs import log_event

HANDSHAKE_TIMEOUT_SECS = 10.0
_MAX_CAPABILITIES = 64


def _peer(writer: asyncio.StreamWriter) -> str | None:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return None


def _capabilities(raw: Any) -> list[str]:
    if not isinstance(raw, list):
        return []
    return [c for c in raw if isinstance(c, str) and len(c) <= 64][:_MAX_CAPABILITIES]


def _short(value: Any, limit: int = 64) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class EdgeGateway:
    """Serves enrollments and client links on one TLS listener."""

    def __init__(
        self,
        store: Store,
        link: RemoteLink,
        ssl_context: ssl.SSLContext,
        host: str,
        port: int,
        *,
        heartbeat_secs: float = HEARTBEAT_SECS,
        dead_after_secs: float = DEAD_AFTER_SECS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_SECS,
        sock: socket.socket | None = None,
    ) -> None:
        self.store = store
        self.link = link
        self.ssl_context = ssl_context
        self.host = host
        self.port = port
        self.heartbeat_secs = heartbeat_secs
        self.dead_after_secs = dead_after_secs
        self.handshake_timeout = handshake_timeout
        self.sock = sock  # bound by the supervisor (own_listeners.py); None: bind host:port here
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def bound_port(self) -> int | None:
        """The port actually listened on (differs from ``port`` when that is 0)."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Serve (binding first unless given a socket); raises ``OSError`` when the
        address cannot be bound."""
        if self.sock is not None:
            self._server = await asyncio.start_server(
                self._on_connect, sock=self.sock, ssl=self.ssl_context,
                ssl_handshake_timeout=self.handshake_timeout,
            )
            return
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self.port, ssl=self.ssl_context,
            ssl_handshake_timeout=self.handshake_timeout, reuse_address=True,
        )

    async def close(self) -> None:
        """Stop accepting and close every link (the clients reconnect later)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.link.close_all("server shutting down")
        if self._conns:
            _, pending = await asyncio.wait(set(self._conns), timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------ connections

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = _peer(writer)
        try:
            try:
                first = await asyncio.wait_for(read_frame(reader), self.handshake_timeout)
            except (TimeoutError, asyncio.IncompleteReadError, WireError, ConnectionError, OSError) as exc:
                log_event("edge.no_first_frame", level="warning", peer=peer,
                          error=str(exc) or type(exc).__name__)
                return
            kind = first["type"]
            if kind == "enroll":
                await self._enroll(first, writer, peer)
            elif kind == "hello":
                await self._hello(first, reader, writer, peer)
            else:
                await self._refuse(writer, "bad_request", f"expected enroll or hello, got {kind!r}")
        except (ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(task)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _refuse(self, writer: asyncio.StreamWriter, code: str, message: str) -> None:
        """Send one ``error`` frame and close (the link is over)."""
        await self._goodbye(writer, {"type": "error", "code": code, "message": message})

    async def _goodbye(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            writer.write(encode_frame(msg))
            await asyncio.wait_for(writer.drain(), 2.0)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2.0)

    async def _enroll(self, msg: dict[str, Any], writer: asyncio.StreamWriter, peer: str | None) -> None:
        async with self.store.write() as db:
            try:
                client, token = await redeem(db, msg.get("code"))
            except EnrollmentInvalid as exc:
                # A refused redemption changes nothing but is on the record.
                await write_audit(db, "edge", "client.enroll", None, outcome="error",
                                  error_code=exc.code, details={"message": exc.message, "peer": peer})
                failure: EnrollmentInvalid | None = exc
            else:
                failure = None
                await write_audit(
                    db, f"client:{client.client_id}", "client.enrolled", f"client:{client.client_id}",
                    details={"peer": peer, "version": _short(msg.get("version"))},
                )
        if failure is not None:
            log_event("edge.enroll_refused", level="warning", peer=peer, reason=failure.message)
            await self._refuse(writer, failure.code, failure.message)
            return
        log_event("edge.enrolled", client_id=client.client_id, client=client.name, peer=peer)
        await self._goodbye(writer, {
            "type": "enrolled", "client_id": client.client_id, "client_name": client.name, "token": token,
        })

    async def _hello(
        self, msg: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str | None
    ) -> None:
        async with self.store.read() as db:
            client = await client_for_token(db, msg.get("token"))
        claimed = msg.get("client_id")
        if client is None or (claimed is not None and claimed != client.client_id):
            log_event("edge.hello_refused", level="warning", peer=peer, reason="unauthenticated",
                      client_id=_short(claimed))
            await self._refuse(writer, "unauthenticated",
                               "the client token is not valid; enroll the client again")
            return
        # No await between this check and attach(): a revoke that started after the
        # token was read is seen here (RemoteLink.banned), one that starts later kicks.
        if client.revoked_at is not None or client.client_id in self.link.banned:
            log_event("edge.hello_refused", level="warning", peer=peer, reason="revoked",
                      client_id=client.client_id)
            await self._refuse(writer, "revoked", f"client {client.name} ({client.client_id}) was revoked")
            return
        session = EdgeSession(
            client.client_id, client.name, reader, writer,
            remote_addr=peer, version=_short(msg.get("version")),
            capabilities=_capabilities(msg.get("capabilities")), connected_since=utc_now(),
            on_frame=self.link.on_frame,
            heartbeat_secs=self.heartbeat_secs, dead_after_secs=self.dead_after_secs,
        )
        # Queued before attach(), so no apply/sync can overtake the welcome.
        session.send({"type": "welcome", "client_id": client.client_id, "client_name": client.name,
                      "heartbeat_secs": _number(self.heartbeat_secs)})
        self.link.attach(session)
        assert self.link.events is not None
        self.link.events.client_connected(client.client_id)
        log_event("edge.connected", client_id=client.client_id, client=client.name, peer=peer,
                  version=session.version, capabilities=session.capabilities)
        try:
            reason = await session.run()
        finally:
            self.link.detach(session)
        log_event("edge.disconnected", client_id=client.client_id, client=session.client_name,
                  peer=peer, reason=reason)
