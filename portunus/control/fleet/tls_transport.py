"""A server-side TLS transport over a non-blocking ``ssl.SSLSocket`` (edge gateway).

Why not the event loop's own TLS (``connect_accepted_socket(ssl=...)``): uvloop
runs OpenSSL over a pair of memory BIOs behind a TCP transport, with a 256 KiB read
buffer per connection, and an idle link keeps all of it.  Here OpenSSL reads and
writes the socket itself (its socket BIO) and, with ``SSL_MODE_RELEASE_BUFFERS``
(set by Python's ``ssl``), frees its record buffers whenever they are empty; the
loop only tells us when the socket is readable or writable (``add_reader`` /
``add_writer``).  Measured (bench/tls_link_memory.py, 2,000 idle links): 16 KiB
per link instead of 24 (docs/fleet.md, "Memory per link").

The transport is an ``asyncio.Transport`` with write-buffer flow control, so
``asyncio.StreamReaderProtocol`` and ``StreamWriter`` run on it unchanged.  TLS
renegotiation is refused by the context (``OP_NO_RENEGOTIATION``), so a write
never has to wait for a read; a read that must write (a TLS 1.3 KeyUpdate
answer) waits for the socket to be writable.  A close flushes the buffer, sends
close_notify and waits at most ``SHUTDOWN_SECS`` for the peer's, as uvloop does.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Callable
from typing import Any

READ_SIZE = 16 * 1024  # one TLS record's plaintext at most: OpenSSL returns one per read
READ_BUDGET = 256 * 1024  # per readiness callback, so one busy link cannot starve the loop
WRITE_CHUNK = 256 * 1024  # handed to SSL_write at once (retried as is after WANT_WRITE)
HIGH_WATER = 64 * 1024  # asyncio's defaults
LOW_WATER = 16 * 1024
SHUTDOWN_SECS = 5.0  # after close_notify, for the peer's close_notify or FIN
_TCP_CLOSE = 7  # tcp_info.tcpi_state after a reset (a FIN leaves CLOSE_WAIT)


async def fd_ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    """Wait until ``fd`` is readable (or writable)."""
    fut = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def start_tls_server(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    protocol_factory: Callable[[], asyncio.Protocol],
    context: ssl.SSLContext,
) -> tuple[SSLSocketTransport, asyncio.Protocol]:
    """Run the server side of the TLS handshake on the accepted ``sock`` and return a
    transport connected to a new protocol.  Owns ``sock`` from the call: it is
    closed when the handshake fails or the caller is cancelled (its deadline)."""
    sock.setblocking(False)
    try:
        tls = context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=False
        )
    except BaseException:
        sock.close()
        raise
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await fd_ready(loop, tls.fileno(), False)
            except ssl.SSLWantWriteError:
                await fd_ready(loop, tls.fileno(), True)
    except BaseException:
        tls.close()
        raise
    protocol = protocol_factory()
    transport = SSLSocketTransport(loop, tls, protocol, context)
    protocol.connection_made(transport)
    transport._start()
    return transport, protocol


class SSLSocketTransport(asyncio.Transport):
    """One established TLS connection; see the module docstring."""

    __slots__ = (
        "_loop",
        "_sock",
        "_fd",
        "_protocol",
        "_context",
        "_reading",
        "_read_wants_write",
        "_chunk",
        "_buffer",
        "_buffered",
        "_high",
        "_low",
        "_paused_writing",
        "_closing",
        "_lost",
        "_shutdown",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ssl.SSLSocket,
        protocol: asyncio.Protocol,
        context: ssl.SSLContext,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._context = context
        self._reading = False
        self._read_wants_write = False
        self._chunk: memoryview | None = None  # in SSL_write, to be retried as is
        self._buffer: list[bytes] = []  # after the chunk
        self._buffered = 0  # bytes in the chunk and the buffer
        self._high, self._low = HIGH_WATER, LOW_WATER
        self._paused_writing = False
        self._closing = False
        self._lost = False
        self._shutdown: asyncio.TimerHandle | None = None  # close_notify sent, waiting

    # ------------------------------------------------------------ BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if name == "peername":
            try:
                return sock.getpeername()
            except OSError:
                return default
        if name == "sockname":
            try:
                return sock.getsockname()
            except OSError:
                return default
        if name in ("socket", "ssl_object"):
            return sock
        if name == "sslcontext":
            return self._context
        if name == "peercert":
            return sock.getpeercert()
        if name == "cipher":
            return sock.cipher()
        if name == "compression":
            return sock.compression()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; send what is buffered, then close_notify, then close."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._buffered:
            self._begin_shutdown()

    def abort(self) -> None:
        self._closing = True
        self._lose(None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # ------------------------------------------------------------ reading

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if not self._closing:
            self._stop_reading()

    def resume_reading(self) -> None:
        if self._closing or self._reading:
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._read_ready)
        if self._sock.pending():  # decrypted bytes that no readiness event will announce
            self._loop.call_soon(self._read_ready)

    def _start(self) -> None:
        self.resume_reading()
        # The first frame may have arrived with the handshake's last flight and sit in
        # OpenSSL's buffer or the socket already.
        self._loop.call_soon(self._read_ready)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _read_ready(self) -> None:
        if not self._reading or self._lost:
            return
        budget = READ_BUDGET
        while budget > 0:
            try:
                data = self._sock.recv(READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:  # a post-handshake message needs an answer out
                self._read_wants_write = True
                self._stop_reading()
                self._loop.add_writer(self._fd, self._write_ready)
                return
            except (OSError, ssl.SSLError) as exc:  # RST, bad record, EOF inside a record
                self._lose(self._reset_or(exc))
                return
            if not data:  # the peer's close_notify
                self._stop_reading()
                if not self._protocol.eof_received():
                    self.close()
                return
            budget -= len(data)
            self._protocol.data_received(data)
            if not self._reading:  # paused or closed by the protocol
                return
            if len(data) < READ_SIZE and not self._sock.pending():
                # Most likely all there was (an idle link's ping): no second read just to
                # hear WANT_READ; if more came, the level-triggered poll calls again.
                return
        self._loop.call_soon(self._read_ready)

    # ------------------------------------------------------------ writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or not data:
            return
        self._buffer.append(bytes(data))
        self._buffered += len(data)
        if self._chunk is None and len(self._buffer) == 1 and not self._read_wants_write:
            self._write_ready()
            if self._chunk is not None:  # the socket is full: wait for it
                self._loop.add_writer(self._fd, self._write_ready)
        self._check_high()

    def _next_chunk(self) -> memoryview | None:
        if self._chunk is None and self._buffer:
            data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
            self._buffer.clear()
            if len(data) > WRITE_CHUNK:
                self._buffer.append(data[WRITE_CHUNK:])
                data = data[:WRITE_CHUNK]
            self._chunk = memoryview(data)
        return self._chunk

    def _write_ready(self) -> None:
        if self._lost:
            return
        if self._read_wants_write:
            self._read_wants_write = False
            if not self._chunk and not self._buffer:
                self._loop.remove_writer(self._fd)
            if not self._closing:
                self.resume_reading()
                self._loop.call_soon(self._read_ready)
        while (chunk := self._next_chunk()) is not None:
            try:
                sent = self._sock.send(chunk)
            except (ssl.SSLWantWriteError, BlockingIOError):
                return  # the writer callback (added by write()) retries the same chunk
            except (OSError, ssl.SSLError) as exc:
                self._lose(exc)
                return
            self._buffered -= sent
            self._chunk = None if sent >= len(chunk) else chunk[sent:]
        self._loop.remove_writer(self._fd)
        if self._paused_writing and self._buffered <= self._low:
            self._paused_writing = False
            self._protocol.resume_writing()
        if self._closing:
            self._begin_shutdown()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_high()

    def _check_high(self) -> None:
        if not self._paused_writing and self._buffered > self._high and not self._lost:
            self._paused_writing = True
            self._protocol.pause_writing()

    # ------------------------------------------------------------ ending

    def _begin_shutdown(self) -> None:
        """Everything is sent: close_notify, then wait for the peer's (or its EOF)."""
        if self._shutdown is not None or self._lost:
            return
        try:
            self._sock.unwrap()  # sends close_notify; raises WANT_READ for the peer's
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except (OSError, ssl.SSLError, ValueError):
            self._lose(None)
            return
        # No FIN yet: uvloop's TLS (the edge client's) takes a FIN for a broken link and
        # drops what it has not decrypted; the peer answers close_notify and closes.
        self._shutdown = self._loop.call_later(SHUTDOWN_SECS, self._lose, None)
        self._loop.add_reader(self._fd, self._drain_peer)

    def _drain_peer(self) -> None:
        """Read and drop whatever the peer still sends, until its EOF or an error
        (closing with unread bytes would reset the connection under our last frame)."""
        while True:
            try:
                if not self._sock.recv(READ_SIZE):
                    break
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            except (OSError, ssl.SSLError, ValueError):
                break
        self._lose(None)

    def _reset_or(self, exc: Exception) -> Exception:
        """``exc``, or ConnectionResetError for an EOF that was a reset: Python's
        ``ssl`` reports a reset seen by OpenSSL's socket BIO as an EOF."""
        if isinstance(exc, ssl.SSLEOFError):
            try:
                info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
            except OSError:
                return exc
            if info[0] == _TCP_CLOSE:
                return ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return exc

    def _lose(self, exc: Exception | None) -> None:
        """Close the socket now and tell the protocol on the next loop turn."""
        if self._lost:
            return
        self._lost = self._closing = True
        self._reading = False
        if self._shutdown is not None:
            self._shutdown.cancel()
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._chunk, self._buffer, self._buffered = None, [], 0
        self._sock.close()
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        # The protocol of this moment: the gateway may have handed the link on.
        self._protocol.connection_lost(exc)
