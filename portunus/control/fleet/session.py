"""One authenticated edge link, server side (control process).

A server may hold ten thousand idle links, so a link costs no task and no timer
of its own (issue 16: every KiB per link is 10 MiB at 10,000):

- the session is the transport's protocol after the hello: frames are cut out of
  ``data_received`` (4-byte length + JSON, at most ``MAX_FRAME``) and handed to
  ``on_frame``; an idle link holds no buffer, no reader and no waiting coroutine;
- outgoing frames are written straight to the transport, which buffers them, so
  the rule service's ``apply``/``sync`` never wait on a slow client and frames
  leave in the order they were sent; a client that stops reading is cut once
  ``MAX_BUFFERED`` bytes wait for it (it gets the full set again on reconnect);
- liveness is two timestamps (``last_rx``, ``last_tx``) that the gateway's one
  sweeper (``sweep``) reads every second or so: it pings a link it has sent
  nothing to for ``ping_secs`` and drops one that sent nothing for
  ``dead_after_secs``;
- when the connection is gone the session calls ``on_end`` with why (for the
  gateway's detach and log line).

Two cadences (docs/edge.md): a client that advertises ``quiet_link`` is told to
ping every ``QUIET_HEARTBEAT_SECS`` (20 s) and is pinged every ``QUIET_PING_SECS``
(20 s), and either side drops the link after ``QUIET_DEAD_AFTER_SECS`` (30 s) of
silence; an older client keeps the original 5 s both ways and 15 s dead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from portunus.ipc import edge_messages as em
from portunus.ipc.edge_wire import (
    HEADER,
    MAX_FRAME,
    WireError,
    decode_body,
    encode_frame,
    to_message,
)

HEARTBEAT_SECS = 5.0
DEAD_AFTER_SECS = 15.0
QUIET_LINK = "quiet_link"
# Frames cost the server CPU per link: at 10,000 idle links, 20 s both ways is 1,000
# frames/s (the 5 s cadence with stats: 6,000).  A TCP link loses no frame, so one
# ping per 20 s still shows a dead or hung peer within 30 s, to either side (10 s of
# slack for a busy loop).  The client also sets TCP_USER_TIMEOUT (edge/link.py).
QUIET_HEARTBEAT_SECS = 20.0  # the client pings at least this often
QUIET_PING_SECS = 20.0  # the server pings a quiet link it has sent nothing to for this long
QUIET_DEAD_AFTER_SECS = 30.0  # either side drops a quiet link silent this long
# After a server-initiated close (revoke), the transport is aborted if the
# goodbye frame has not drained by then: revoke must take effect within 1 s.
CLOSE_GRACE_SECS = 0.5
# Bytes waiting for a client that does not read: beyond this the link is cut.
# Above the largest frame (16 MiB) so one full sync to a slow client fits.
MAX_BUFFERED = 48 * 1024 * 1024
_PING = encode_frame(em.Ping())


class EdgeSession(asyncio.Protocol):
    """A live link and its transport's protocol; created by the gateway after a
    good ``hello``."""

    __slots__ = (
        "client_id",
        "client_name",
        "remote_addr",
        "version",
        "capabilities",
        "connected_since",
        "ping_secs",
        "dead_after_secs",
        "last_rx",
        "last_tx",
        "_transport",
        "_buf",
        "_closing",
        "_on_frame",
        "_on_end",
        "close_reason",
        "_error",
        "_loop",
    )

    def __init__(
        self,
        client_id: str,
        client_name: str,
        transport: asyncio.Transport,
        *,
        remote_addr: str | None,
        version: str | None,
        capabilities: list[str],
        connected_since: str,
        on_frame: Callable[[EdgeSession, em.Frame], None],
        on_end: Callable[[EdgeSession, str], None],
        heartbeat_secs: float = HEARTBEAT_SECS,
        dead_after_secs: float = DEAD_AFTER_SECS,
    ) -> None:
        self.client_id = client_id
        self.client_name = client_name
        self.remote_addr = remote_addr
        self.version = version
        self.capabilities = capabilities
        self.connected_since = connected_since
        self.ping_secs = heartbeat_secs
        self.dead_after_secs = dead_after_secs
        self._loop = asyncio.get_running_loop()
        self.last_rx = self.last_tx = self._loop.time()
        self._transport = transport
        self._buf: bytearray | None = None  # a frame's first bytes, until the rest comes
        self._closing = False
        self._on_frame = on_frame
        self._on_end = on_end
        self.close_reason: str | None = None
        self._error: str | None = None  # why the reading side ended the link

    @property
    def closing(self) -> bool:
        return self._closing

    def start(self, pending: bytes) -> None:
        """Take over the transport (from the gateway's pre-auth reader, with the
        bytes it read past the hello)."""
        transport = self._transport
        transport.set_protocol(self)
        if pending:
            self.data_received(pending)
        if not transport.is_closing():
            transport.resume_reading()

    def send(self, msg: em.Frame) -> None:
        """Write one frame; silently dropped once the session is closing."""
        if self._closing:
            return
        try:
            data = encode_frame(msg)
        except WireError as exc:  # a frame over 16 MiB: the link cannot carry it
            self.close(None, f"cannot send a {em.kind(msg)} frame: {exc}")
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() + len(data) > MAX_BUFFERED:
            self.close(None, f"client is not reading ({MAX_BUFFERED // 2**20} MiB waiting)")
            return
        transport.write(data)
        self.last_tx = self._loop.time()

    def close(self, goodbye: em.Error | None, reason: str) -> None:
        """End the session: send ``goodbye`` (e.g. ``error: revoked``) if given,
        then close; the transport is aborted after ``CLOSE_GRACE_SECS`` at most."""
        if self._closing:
            return
        if goodbye is not None:
            self.send(goodbye)
        self._closing = True
        self.close_reason = reason
        self._transport.close()  # flushes what is buffered, then ends the link
        self._loop.call_later(CLOSE_GRACE_SECS, self._abort)

    def _abort(self) -> None:
        # Unconditional: a peer that never answers the TLS close_notify would
        # otherwise hold the transport for the TLS layer's own shutdown timeout.
        self._transport.abort()

    def sweep(self, now: float) -> None:
        """Called by the gateway's sweeper: ping when quiet, drop when dead."""
        if self._closing:
            return
        if now - self.last_rx > self.dead_after_secs:
            self.close(None, f"no frame for {self.dead_after_secs:g} s (dead link)")
            self._transport.abort()  # nobody is listening: no goodbye to drain
        elif now - self.last_tx >= self.ping_secs:
            self._write(_PING)

    # ------------------------------------------------------------ the protocol

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        buf: bytes | bytearray = data
        if self._buf is not None:
            self._buf += data
            buf = self._buf
        at, end = 0, len(buf)
        while end - at >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, at)
            if length > MAX_FRAME:
                self._fail(f"bad frame: frame of {length} bytes exceeds {MAX_FRAME}")
                return
            if end - at - HEADER.size < length:
                break
            body = bytes(buf[at + HEADER.size : at + HEADER.size + length])
            at += HEADER.size + length
            try:
                msg = to_message(decode_body(body))
            except WireError as exc:
                self._fail(f"bad frame: {exc}")
                return
            self.last_rx = self._loop.time()
            if not self._closing:
                self._on_frame(self, msg)
        if at == end:
            self._buf = None
        elif self._buf is None:
            self._buf = bytearray(memoryview(data)[at:])
        else:
            del self._buf[:at]

    def _fail(self, reason: str) -> None:
        self._error = reason
        self._buf = None
        self._closing = True
        self._transport.abort()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost tells why

    def connection_lost(self, exc: Exception | None) -> None:
        closing, self._closing, self._buf = self._closing, True, None
        if self.close_reason is not None:
            reason = self.close_reason
        elif self._error is not None:
            reason = self._error
        elif exc is not None:
            reason = f"connection error: {exc}"
        else:
            reason = "closed" if closing else "the client closed the link"
        self._on_end(self, reason)
