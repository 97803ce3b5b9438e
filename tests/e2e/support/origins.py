"""TCP origins for the forwarded traffic: ``Origin`` runs a handler in one thread per
connection and records each connection's byte counts and SHA-256; the handlers
(``echo``, ``sink``, ``source``, ``duplex``, ...) are the behaviours tests need."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from .polling import wait_for
from .ports import LOOPBACK
from .streams import Digest, KiB, Pattern, connect, recv_all, recv_exact, send_pattern


class ConnRecord:
    """What one origin connection saw: counts and checksums both ways."""

    __slots__ = ("rx", "tx", "peer", "error", "done", "sock", "extra")

    def __init__(self, sock: socket.socket, peer: Any) -> None:
        self.rx = Digest()
        self.tx = Digest()
        self.peer = peer
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.sock = sock
        self.extra: dict[str, Any] = {}


Handler = Callable[[socket.socket, ConnRecord], None]


class Origin:
    """A TCP server on 127.0.0.1 (or another loopback ``host``, ``::1`` included)
    running ``handler`` in one thread per connection.

    ``records`` lists every connection in accept order.  ``close`` stops accepting,
    shuts down every open connection (which unblocks the handlers) and joins.
    """

    def __init__(
        self, handler: Handler, port: int = 0, backlog: int = 1024, host: str = LOOPBACK
    ) -> None:
        self.handler = handler
        self.host = host
        self.lsock = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
        )
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, port))
        self.lsock.listen(backlog)
        self.lsock.settimeout(0.1)
        self.port: int = self.lsock.getsockname()[1]
        self.records: list[ConnRecord] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"origin-{self.port}", daemon=True
        )
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            rec = ConnRecord(conn, peer)
            t = threading.Thread(target=self._run, args=(conn, rec), daemon=True)
            with self._lock:
                self.records.append(rec)
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _run(self, conn: socket.socket, rec: ConnRecord) -> None:
        try:
            self.handler(conn, rec)
        except BaseException as exc:  # noqa: BLE001 - record, never raise in a thread
            rec.error = exc
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            rec.done.set()

    def wait_connections(self, n: int, timeout: float = 10.0) -> list[ConnRecord]:
        wait_for(
            lambda: len(self.records) >= n, timeout, what=f"{n} origin connection(s) on {self.port}"
        )
        return self.records[:n]

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.lsock.close()
        self._acceptor.join(5)
        with self._lock:
            records = list(self.records)
            threads = list(self._threads)
        for rec in records:
            if not rec.done.is_set():
                with contextlib.suppress(OSError):
                    rec.sock.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(5)

    def __enter__(self) -> Origin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OriginFactory:
    """What the ``origin`` fixtures hand out: ``origins(handler, port=0) -> Origin``
    (a given port for origins that must sit on one: range targets, a restarted
    primary); every origin made is closed at ``close``."""

    def __init__(self) -> None:
        self.made: list[Origin] = []

    def __call__(self, handler: Handler, port: int = 0) -> Origin:
        o = Origin(handler, port=port)
        self.made.append(o)
        return o

    def close(self) -> None:
        for o in self.made:
            o.close()


def echo(conn: socket.socket, rec: ConnRecord) -> None:
    """Echo everything; pass the client's half-close on."""
    buf = bytearray(256 * KiB)
    view = memoryview(buf)
    while n := conn.recv_into(buf):
        rec.rx.update(view[:n])
        conn.sendall(view[:n])
        rec.tx.update(view[:n])
    conn.shutdown(socket.SHUT_WR)


def sink(reply: Pattern | None = None) -> Handler:
    """Read to EOF (checksummed); only then send ``reply`` and close."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        recv_all(conn, rec.rx)
        rec.extra["eof_at"] = time.monotonic()
        if reply is not None:
            send_pattern(conn, reply, rec.tx)
        conn.shutdown(socket.SHUT_WR)

    return handler


def source(pattern: Pattern, then_read: bool = True) -> Handler:
    """Send ``pattern`` right away, half-close, then read to EOF."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        send_pattern(conn, pattern, rec.tx)
        conn.shutdown(socket.SHUT_WR)
        if then_read:
            recv_all(conn, rec.rx)

    return handler


def duplex(pattern: Pattern) -> Handler:
    """Send ``pattern`` while reading to EOF at the same time (full duplex)."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        errors: list[BaseException] = []

        def push() -> None:
            try:
                send_pattern(conn, pattern, rec.tx)
                conn.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=push, daemon=True)
        t.start()
        recv_all(conn, rec.rx)
        t.join()
        if errors:
            raise errors[0]

    return handler


REQUEST = struct.Struct("!QQI")  # token, bytes the origin must send back, pattern seed


def request_header(token: int, reply_size: int, seed: int) -> bytes:
    return REQUEST.pack(token, reply_size, seed)


def duplex_on_request(conn: socket.socket, rec: ConnRecord) -> None:
    """The client states what it wants in a ``REQUEST`` header; the origin then
    streams that many pattern bytes back while reading the client's payload to EOF.
    One origin serves every size; ``rec.extra["token"]`` ties the record to a test."""
    token, size, seed = REQUEST.unpack(recv_exact(conn, REQUEST.size))
    rec.extra["token"] = token
    duplex(Pattern(size, seed))(conn, rec)


def client_duplex(
    port: int, send: Pattern, reply: Pattern, token: int, timeout: float = 60.0
) -> tuple[Digest, Digest]:
    """Client side of ``duplex_on_request``: send ``send`` while receiving the
    reply, both at once; returns (sent, received) digests (header excluded)."""
    with connect(port, timeout) as s:
        s.sendall(request_header(token, reply.size, reply.seed))
        sent = Digest()
        errors: list[BaseException] = []

        def push() -> None:
            try:
                send_pattern(s, send, sent)
                s.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=push, daemon=True)
        t.start()
        received = recv_all(s)
        t.join(timeout)
        if errors:
            raise errors[0]
        return sent, received


def exchange(n_in: int, reply: Pattern) -> Handler:
    """Read exactly ``n_in`` bytes, answer with ``reply``, then wait for EOF: the
    connection stays open (for as long as the client keeps it) after both moved."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        recv_all(conn, rec.rx, limit=n_in)
        send_pattern(conn, reply, rec.tx)
        recv_all(conn, rec.rx)

    return handler


def slow_source(pattern: Pattern, interval: float) -> Handler:
    """Send ``pattern`` one chunk every ``interval`` seconds, then close."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        for i, chunk in enumerate(pattern.chunks()):
            if i:
                time.sleep(interval)
            conn.sendall(chunk)
            rec.tx.update(chunk)
        conn.shutdown(socket.SHUT_WR)
        recv_all(conn, rec.rx)

    return handler


def push_forever(chunk: int = 64 * KiB) -> Handler:
    """Send until the peer goes away; ``rec.tx.count`` shows how far it got."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        data = random.Random(7).randbytes(chunk)
        with contextlib.suppress(OSError):
            while True:
                conn.sendall(data)
                rec.tx.count += len(data)

    return handler
