"""One authenticated edge link, server side (control process).

Outgoing frames go through a queue drained by one writer task, so the rule
service's ``apply``/``sync`` never wait on a slow or stalled client, and frames
leave in the order they were queued.  The writer sends a ``ping`` whenever the
link has been quiet for ``heartbeat_secs``; the reader declares the link dead
when nothing at all arrived for ``dead_after_secs`` (docs/edge.md: 15 s).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from portunus.edge.wire import WireError, encode_frame, read_frame

HEARTBEAT_SECS = 5.0
DEAD_AFTER_SECS = 15.0
# After a server-initiated close (revoke), the transport is aborted if the
# goodbye frame has not drained by then: revoke must take effect within 1 s.
CLOSE_GRACE_SECS = 0.5
# Frames queued for a client that does not read: beyond this the link is cut
# (the client gets the full set again when it reconnects).
MAX_QUEUED = 10_000
_CLOSE = object()
_PING = {"type": "ping"}


class EdgeSession:
    """A live link; created by the gateway after a good ``hello``."""

    __slots__ = (
        "client_id", "client_name", "remote_addr", "version", "capabilities", "connected_since",
        "heartbeat_secs", "dead_after_secs", "_reader", "_writer", "_queue", "_closing",
        "_on_frame", "close_reason",
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
        on_frame: Callable[[EdgeSession, dict[str, Any]], None],
        heartbeat_secs: float = HEARTBEAT_SECS,
        dead_after_secs: float = DEAD_AFTER_SECS,
    ) -> None:
        self.client_id = client_id
        self.client_name = client_name
        self.remote_addr = remote_addr
        self.version = version
        self.capabilities = capabilities
        self.connected_since = connected_since
        self.heartbeat_secs = heartbeat_secs
        self.dead_after_secs = dead_after_secs
        self._reader = reader
        self._writer = writer
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._closing = False
        self._on_frame = on_frame
        self.close_reason: str | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    def send(self, msg: dict[str, Any]) -> None:
        """Queue one frame; silently dropped once the session is closing."""
        if self._closing:
            return
        if self._queue.qsize() >= MAX_QUEUED:
            self.close(None, f"client is not reading ({MAX_QUEUED} frames queued)")
            return
        self._queue.put_nowait(msg)

    def close(self, goodbye: dict[str, Any] | None, reason: str) -> None:
        """End the session: send ``goodbye`` (e.g. ``error: revoked``) if given,
        then close; the transport is aborted after ``CLOSE_GRACE_SECS`` at most."""
        if self._closing:
            return
        if goodbye is not None:
            self._queue.put_nowait(goodbye)
        self._closing = True
        self.close_reason = reason
        self._queue.put_nowait(_CLOSE)
        asyncio.get_running_loop().call_later(CLOSE_GRACE_SECS, self._abort)

    def _abort(self) -> None:
        transport = self._writer.transport
        if not transport.is_closing():
            transport.abort()

    async def run(self) -> str:
        """Serve the link until it ends; return why (for the log)."""
        writer_task = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            reason = await self._read_loop(writer_task)
        finally:
            writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer_task
            self._closing = True
            self._abort()
        return self.close_reason or reason

    async def _read_loop(self, writer_task: asyncio.Task[None]) -> str:
        while True:
            read = asyncio.ensure_future(read_frame(self._reader))
            done, _ = await asyncio.wait({read, writer_task}, timeout=self.dead_after_secs,
                                         return_when=asyncio.FIRST_COMPLETED)
            if read not in done:
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError, asyncio.IncompleteReadError,
                                         WireError, ConnectionError, OSError):
                    await read
                if writer_task in done:
                    return "closed"
                return f"no frame for {self.dead_after_secs:g} s (dead link)"
            try:
                msg = read.result()
            except asyncio.IncompleteReadError:
                return "the client closed the link"
            except WireError as exc:
                return f"bad frame: {exc}"
            except (ConnectionError, OSError) as exc:
                return f"connection error: {exc}"
            if not self._closing:
                self._on_frame(self, msg)

    async def _write_loop(self) -> None:
        """Ends when the session closes or the link breaks (never raises)."""
        while True:
            try:
                async with asyncio.timeout(self.heartbeat_secs):  # not wait_for: see edge/link.py
                    msg = await self._queue.get()
            except TimeoutError:
                msg = _PING
            if msg is _CLOSE:
                self._writer.close()
                return
            try:
                self._writer.write(encode_frame(msg))
                await self._writer.drain()
            except WireError as exc:  # a frame over 16 MiB: the link cannot carry it
                self.close_reason = self.close_reason or f"cannot send a {msg.get('type')} frame: {exc}"
                self._closing = True
                return
            except (ConnectionError, OSError) as exc:
                self.close_reason = self.close_reason or f"connection error while writing: {exc}"
                self._closing = True
                return
