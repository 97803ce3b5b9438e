"""One authenticated edge link, server side (control process).

A server may hold ten thousand idle links, so a link costs one task (its reader)
and no timer of its own:

- outgoing frames are written straight to the transport, which buffers them, so
  the rule service's ``apply``/``sync`` never wait on a slow client and frames
  leave in the order they were sent; a client that stops reading is cut once
  ``MAX_BUFFERED`` bytes wait for it (it gets the full set again on reconnect);
- liveness is two timestamps (``last_rx``, ``last_tx``) that the gateway's one
  sweeper (``sweep``) reads every second or so: it pings a link it has sent
  nothing to for ``ping_secs`` and drops one that sent nothing for
  ``dead_after_secs``.

Two cadences (docs/edge.md): a client that advertises ``quiet_link`` is told to
ping every ``QUIET_HEARTBEAT_SECS`` (20 s) and is pinged every ``QUIET_PING_SECS``
(20 s), and either side drops the link after ``QUIET_DEAD_AFTER_SECS`` (30 s) of
silence; an older client keeps the original 5 s both ways and 15 s dead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from portunus.ipc import edge_messages as em
from portunus.ipc.edge_wire import WireError, encode_frame, read_message

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


class EdgeSession:
    """A live link; created by the gateway after a good ``hello``."""

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
        "_reader",
        "_writer",
        "_closing",
        "_on_frame",
        "close_reason",
        "_loop",
    )

    def __init__(
        self,
        client_id: str,
        client_name: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        remote_addr: str | None,
        version: str | None,
        capabilities: list[str],
        connected_since: str,
        on_frame: Callable[[EdgeSession, em.Frame], None],
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
        self._reader = reader
        self._writer = writer
        self._closing = False
        self._on_frame = on_frame
        self.close_reason: str | None = None

    @property
    def closing(self) -> bool:
        return self._closing

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
        transport = self._writer.transport
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
        self._writer.transport.close()  # flushes what is buffered, then ends the reader
        self._loop.call_later(CLOSE_GRACE_SECS, self._abort)

    def _abort(self) -> None:
        # Unconditional: a peer that never answers the TLS close_notify would
        # otherwise hold the transport for the TLS layer's own shutdown timeout.
        self._writer.transport.abort()

    def sweep(self, now: float) -> None:
        """Called by the gateway's sweeper: ping when quiet, drop when dead."""
        if self._closing:
            return
        if now - self.last_rx > self.dead_after_secs:
            self.close(None, f"no frame for {self.dead_after_secs:g} s (dead link)")
            self._writer.transport.abort()  # nobody is listening: no goodbye to drain
        elif now - self.last_tx >= self.ping_secs:
            self._write(_PING)

    async def run(self) -> str:
        """Serve the link until it ends; return why (for the log)."""
        try:
            reason = await self._read_loop()
        finally:
            self._closing = True
            self._writer.transport.abort()
        return self.close_reason or reason

    async def _read_loop(self) -> str:
        while True:
            try:
                msg = await read_message(self._reader)
            except asyncio.IncompleteReadError:
                return "closed" if self._closing else "the client closed the link"
            except WireError as exc:
                return f"bad frame: {exc}"
            except (ConnectionError, OSError) as exc:
                return f"connection error: {exc}"
            self.last_rx = self._loop.time()
            if not self._closing:
                self._on_frame(self, msg)
