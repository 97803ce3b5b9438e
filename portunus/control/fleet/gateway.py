"""The edge gateway: TLS on ``control_listen`` (control process).

A fresh connection's first frame decides what it is (docs/edge.md): ``enroll``
redeems a one-time code for a token and the connection closes; ``hello``
authenticates a client by its token and becomes that client's session until
either side closes it.  Everything after the hello is ``EdgeSession`` and
``RemoteLink``'s business.

Until that first frame a connection is anonymous; ``control.fleet.preauth`` bounds
what it may cost.  ``control.fleet.listener`` accepts and refuses a connection over
the anonymous limits before its TLS handshake; an admitted one gets one deadline
for the handshake and the first frame together.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
from typing import Any

from portunus.control.fleet.enrollment import EnrollmentInvalid, client_for_token, redeem
from portunus.control.fleet.heap import release_free_heap
from portunus.control.fleet.listener import (
    BACKLOG,
    Parking,
    accept_loop,
    bind,
    park_capacity,
    refuse,
)
from portunus.control.fleet.preauth import (
    DEFAULT_HANDSHAKE_TIMEOUT_SECS,
    DEFAULT_PARK_SECS,
    PREAUTH_MAX_FRAME,
    AuditBudget,
    PreauthLimits,
    PreauthSlot,
)
from portunus.control.fleet.remote_link import RemoteLink
from portunus.control.fleet.session import (
    DEAD_AFTER_SECS,
    HEARTBEAT_SECS,
    QUIET_DEAD_AFTER_SECS,
    QUIET_HEARTBEAT_SECS,
    QUIET_LINK,
    QUIET_PING_SECS,
    EdgeSession,
)
from portunus.control.fleet.shedding import Shedder
from portunus.control.fleet.tls_transport import start_tls_server
from portunus.control.store import Store, utc_now, write_audit
from portunus.ipc import edge_messages as em
from portunus.ipc.edge_wire import FrameTooLarge, WireError, encode_frame, read_message
from portunus.logs import flush_throttled, log_event, log_throttled

HANDSHAKE_TIMEOUT_SECS = DEFAULT_HANDSHAKE_TIMEOUT_SECS
# A storm of TLS handshakes (a fleet reconnecting after a restart) leaves the
# allocator's high-water mark behind: ~20 KiB per link that glibc keeps but nobody
# uses (measured with bench.edge_clients).  After that many handshakes, at most every
# TRIM_EVERY_SECS, the free heap is given back to the kernel.
TRIM_AFTER_HANDSHAKES = 256
TRIM_EVERY_SECS = 10.0
_MAX_CAPABILITIES = 64


def _capabilities(raw: Any) -> list[str]:
    """The hello's capabilities, interned: ten thousand sessions then share one copy
    of each name instead of holding ~0.5 KiB of equal strings each."""
    if not isinstance(raw, list):
        return []
    kept = [c for c in raw if isinstance(c, str) and len(c) <= 64][:_MAX_CAPABILITIES]
    return [sys.intern(c) for c in kept]


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
        park_secs: float = DEFAULT_PARK_SECS,
        preauth: PreauthLimits | None = None,
        quiet: tuple[float, float, float] = (
            QUIET_HEARTBEAT_SECS,
            QUIET_PING_SECS,
            QUIET_DEAD_AFTER_SECS,
        ),
        shedder: Shedder | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.store = store
        self.link = link
        self.ssl_context = ssl_context
        self.host = host
        self.port = port
        self.heartbeat_secs = heartbeat_secs
        self.dead_after_secs = dead_after_secs
        # quiet_link clients: (their heartbeat, our ping, dead after), see session.py
        self.quiet = quiet
        self.shedder = shedder or Shedder(None)
        self.handshake_timeout = handshake_timeout
        self.preauth = preauth or PreauthLimits()
        # A parked connection waits at most park_secs (default 25 s), inside its
        # client's 30 s connect budget (portunus.edge.timing): held, a restart storm's
        # surplus is served in one pass instead of coming back in backoff waves.
        self.parking = Parking(self.preauth, self._admitted, park_secs, park_capacity())
        self.audit_budget = AuditBudget()
        self.sock = sock  # bound by the supervisor (own_listeners.py); None: bind host:port here
        self._sockets: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []  # accept loops and the log flusher
        self._conns: set[asyncio.Task[None]] = set()  # until the hello: a session needs none
        self._handshakes = 0  # connections admitted since the heap was last trimmed

    @property
    def bound_port(self) -> int | None:
        """The port actually listened on (differs from ``port`` when that is 0)."""
        if not self._sockets:
            return None
        return int(self._sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Serve (binding first unless given a socket); raises ``OSError`` when the
        address cannot be bound."""
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            self.sock.setblocking(False)  # accept_loop uses loop.sock_accept
            # The supervisor listened with its default backlog; a reconnect storm
            # waits in this one (listener.BACKLOG), so raise it.
            self.sock.listen(BACKLOG)
            self._sockets = [self.sock]
        else:
            self._sockets = await loop.run_in_executor(None, bind, self.host, self.port)
        self._tasks = [
            loop.create_task(accept_loop(s, self.preauth, self._admitted, self.parking))
            for s in self._sockets
        ]
        self._tasks.append(loop.create_task(self._flush_logs()))
        self._tasks.append(loop.create_task(self._sweep()))

    def sweep_every(self) -> float:
        """The sweeper's tick: a quarter of the shortest interval, 20 ms to 1 s."""
        shortest = min(self.heartbeat_secs, self.dead_after_secs, *self.quiet)
        return max(0.02, min(1.0, shortest / 4))

    async def _sweep(self) -> None:
        """One timer for every link: ping the quiet ones, drop the dead ones
        (EdgeSession.sweep), instead of two timers per link."""
        loop = asyncio.get_running_loop()
        every = self.sweep_every()
        trimmed_at = loop.time()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for session in list(self.link.sessions.values()):
                session.sweep(now)
            self.parking.expire()
            if self._handshakes >= TRIM_AFTER_HANDSHAKES and now - trimmed_at >= TRIM_EVERY_SECS:
                self._handshakes, trimmed_at = 0, now
                release_free_heap()

    async def _flush_logs(self) -> None:
        """Summarize throttled refusal lines once a flood is over (``log.suppressed``)."""
        while True:
            await asyncio.sleep(1.0)
            flush_throttled()

    async def close(self) -> None:
        """Stop accepting and close every link (the clients reconnect later)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        self.parking.close()
        self.link.close_all("server shutting down")
        # A session ends (and detaches) within its close grace (session.CLOSE_GRACE_SECS).
        loop = asyncio.get_running_loop()
        until = loop.time() + 2.0
        while self.link.sessions and loop.time() < until:
            await asyncio.sleep(0.02)
        if self._conns:
            _, pending = await asyncio.wait(set(self._conns), timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------ connections

    def _admitted(self, conn: socket.socket, peer: str | None, slot: PreauthSlot) -> None:
        self._handshakes += 1
        # Reclaimable from the start: a burst of accepts may admit many before any
        # of their tasks runs; one reclaimed by then ends as soon as it starts.
        slot.on_evict = _nothing
        task = asyncio.get_running_loop().create_task(self._serve(conn, peer, slot))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket, peer: str | None, slot: PreauthSlot) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            opened = await self._first_frame(conn, peer, slot)
            if opened is None:
                return
            _, writer, first = opened
            if isinstance(first, em.Enroll):
                await self._enroll(first, writer, peer)
            elif isinstance(first, em.Hello):
                if await self._hello(first, writer, peer, slot):
                    writer = None  # the session owns the transport now
            else:
                kind = em.kind(first)
                await self._refuse(writer, "bad_request", f"expected enroll or hello, got {kind!r}")
        except (ConnectionError, OSError):
            pass
        finally:
            slot.release()
            if writer is not None and not writer.transport.is_closing():
                writer.transport.abort()

    async def _first_frame(
        self, conn: socket.socket, peer: str | None, slot: PreauthSlot
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, em.Frame] | None:
        """TLS handshake and the first frame, under one deadline; None when the
        connection is over (the reason is counted and logged, throttled).  While
        it runs, the preauth limits may bring the deadline forward to now
        (``slot.on_evict``) to make room for a newer connection."""
        loop = asyncio.get_running_loop()
        if slot.evicted:  # reclaimed before this task ran: nothing was read yet
            refuse(conn)
            self.preauth.refused("evicted", peer)
            return None
        reader = asyncio.StreamReader(limit=PREAUTH_MAX_FRAME)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(self.handshake_timeout) as deadline:
                slot.on_evict = lambda: deadline.reschedule(loop.time())
                try:
                    # From here start_tls_server owns ``conn`` (closed if the handshake
                    # fails or the deadline cancels it), then the transport does.
                    transport, _ = await start_tls_server(
                        loop, conn, lambda: protocol, self.ssl_context
                    )
                    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
                    return reader, writer, await read_message(reader, PREAUTH_MAX_FRAME)
                finally:
                    slot.on_evict = None
        except TimeoutError:
            if slot.evicted:
                self.preauth.refused("evicted", peer)
            else:
                self.preauth.refused("timeout", peer, timeout_secs=self.handshake_timeout)
        except FrameTooLarge as exc:
            self.preauth.refused("frame_too_large", peer, error=str(exc))
        except (asyncio.IncompleteReadError, WireError, ConnectionError, OSError) as exc:
            log_throttled(
                "edge.no_first_frame",
                level="warning",
                peer=peer,
                error=str(exc) or type(exc).__name__,
            )
        # Without a transport, start_tls_server failed and closed ``conn``.
        if transport is not None:
            transport.abort()
        return None

    async def _refuse(self, writer: asyncio.StreamWriter, code: str, message: str) -> None:
        """Send one ``error`` frame and close (the link is over)."""
        await self._goodbye(writer, em.Error(code=code, message=message))

    async def _goodbye(self, writer: asyncio.StreamWriter, msg: em.Frame) -> None:
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            writer.write(encode_frame(msg))
            await asyncio.wait_for(writer.drain(), 2.0)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2.0)

    async def _enroll(self, msg: em.Enroll, writer: asyncio.StreamWriter, peer: str | None) -> None:
        async with self.store.write() as db:
            try:
                client, token = await redeem(db, msg.code)
            except EnrollmentInvalid as exc:
                # A refused redemption changes nothing but is on the record (within
                # the audit budget: anyone can send one per connection).
                unaudited = self.audit_budget.take()
                if unaudited is not None:
                    details: dict[str, Any] = {"message": exc.message, "peer": peer}
                    if unaudited:
                        details["unaudited_before"] = unaudited
                    await write_audit(
                        db,
                        "edge",
                        "client.enroll",
                        None,
                        outcome="error",
                        error_code=exc.code,
                        details=details,
                    )
                failure: EnrollmentInvalid | None = exc
            else:
                failure = None
                await write_audit(
                    db,
                    f"client:{client.client_id}",
                    "client.enrolled",
                    f"client:{client.client_id}",
                    details={"peer": peer, "version": _short(msg.version)},
                )
        if failure is not None:
            self.preauth.count("enrollment_invalid")
            log_throttled("edge.enroll_refused", level="warning", peer=peer, reason=failure.message)
            await self._refuse(writer, failure.code, failure.message)
            return
        log_event("edge.enrolled", client_id=client.client_id, client=client.name, peer=peer)
        await self._goodbye(
            writer, em.Enrolled(client_id=client.client_id, client_name=client.name, token=token)
        )

    async def _hello(
        self,
        msg: em.Hello,
        writer: asyncio.StreamWriter,
        peer: str | None,
        slot: PreauthSlot,
    ) -> bool:
        """Refuse, shed, or hand the link to a new ``EdgeSession``; True when handed
        over (this connection's task then ends: the session needs none)."""
        async with self.store.read() as db:
            client = await client_for_token(db, msg.token)
        claimed = msg.client_id
        if client is None or (claimed is not None and claimed != client.client_id):
            self.preauth.count("unauthenticated")
            log_throttled(
                "edge.hello_refused",
                level="warning",
                peer=peer,
                reason="unauthenticated",
                client_id=_short(claimed),
            )
            await self._refuse(
                writer, "unauthenticated", "the client token is not valid; enroll the client again"
            )
            return False
        # No await between this check and attach(): a revoke that started after the
        # token was read is seen here (RemoteLink.banned), one that starts later kicks.
        if client.revoked_at is not None or client.client_id in self.link.banned:
            log_event(
                "edge.hello_refused",
                level="warning",
                peer=peer,
                reason="revoked",
                client_id=client.client_id,
            )
            await self._refuse(
                writer, "revoked", f"client {client.name} ({client.client_id}) was revoked"
            )
            return False
        retry_after = self.shedder.retry_after()
        if retry_after is not None:
            log_throttled(
                "edge.busy",
                level="warning",
                peer=peer,
                client_id=client.client_id,
                retry_after=retry_after,
                backlog=self.shedder.backlog(),
            )
            await self._goodbye(writer, self.shedder.busy_frame(retry_after))
            return False
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        if transport.is_closing():  # the client left while its token was checked
            return False
        slot.release()  # authenticated: no longer anonymous, the normal frame limit applies
        capabilities = _capabilities(msg.capabilities)
        welcome = em.Welcome(client_id=client.client_id, client_name=client.name)
        if QUIET_LINK in capabilities:
            beat, ping, dead = self.quiet
            welcome.heartbeat_secs = _number(beat)
            welcome.ping_secs = _number(ping)
            welcome.dead_after_secs = _number(dead)
        else:
            ping, dead = self.heartbeat_secs, self.dead_after_secs
            welcome.heartbeat_secs = _number(ping)
        session = EdgeSession(
            client.client_id,
            client.name,
            transport,
            remote_addr=peer,
            version=_short(msg.version),
            capabilities=capabilities,
            connected_since=utc_now(),
            on_frame=self.link.on_frame,
            on_end=self._session_ended,
            heartbeat_secs=ping,
            dead_after_secs=dead,
        )
        # Written before attach(), so no apply/sync can overtake the welcome.
        session.send(welcome)
        self.link.attach(session)
        assert self.link.events is not None
        self.link.events.client_connected(client.client_id)
        log_event(
            "edge.connected",
            client_id=client.client_id,
            client=client.name,
            peer=peer,
            version=session.version,
            capabilities=session.capabilities,
        )
        # From here the link costs the session and the transport, nothing else: no
        # task, no stream objects (they are dropped with this connection's task).
        session.start(_take_buffered(writer))
        return True

    def _session_ended(self, session: EdgeSession, reason: str) -> None:
        self.link.detach(session)
        log_event(
            "edge.disconnected",
            client_id=session.client_id,
            client=session.client_name,
            peer=session.remote_addr,
            reason=reason,
        )


def _take_buffered(writer: asyncio.StreamWriter) -> bytes:
    """What the pre-auth reader read past the hello (a client may send frames right
    after it).  ``StreamReader`` has no call that takes its buffer without waiting,
    so its ``_buffer`` is read directly."""
    protocol = writer.transport.get_protocol()
    reader = getattr(protocol, "_stream_reader", None)
    buffered = getattr(reader, "_buffer", None)
    return bytes(buffered) if buffered else b""


def _nothing() -> None:
    """``PreauthSlot.on_evict`` of a connection whose task has not started yet."""
