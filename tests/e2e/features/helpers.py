"""Helpers for the forwarding-feature tests (ranges, DNS, failover, PROXY, SNI, UDP).

- ``ServerProc`` / ``ServerFactory`` / ``CliResult``: re-exported from
  tests/e2e/support/server.py (one server fixture for every e2e directory).
- ``port_reporter``: an origin handler that first writes the port it was reached
  on, so one look at the reply tells which same-offset target a range port used.
- ``UdpPortEcho``: a UDP echo on several ports that prefixes each reply with the
  port it arrived on.
- ``bindable``: can this process bind a port right now (proof that nothing kept it)?
- ``StreamListener``: an ``Origin`` on any loopback address/family.

Everything binds loopback only.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Callable

from tests.e2e.support import (
    LOOPBACK,
    SERVER_BIN,
    CliResult,
    ConnRecord,
    Origin,
    ServerFactory,
    ServerProc,
    recv_exact,
)

__all__ = [
    "SERVER_BIN",
    "CliResult",
    "ServerFactory",
    "ServerProc",
    "StreamListener",
    "UdpPortEcho",
    "bindable",
    "port_reporter",
    "reached_port",
    "read_line",
    "udp_exchange",
]


# ------------------------------------------------------------------ origins


def port_reporter(conn: socket.socket, rec: ConnRecord) -> None:
    """Write ``<local port>\\n`` first, then echo; half-close passes on."""
    hello = f"{conn.getsockname()[1]}\n".encode()
    conn.sendall(hello)
    rec.tx.update(hello)
    while True:
        data = conn.recv(65536)
        if not data:
            break
        rec.rx.update(data)
        conn.sendall(data)
        rec.tx.update(data)
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)


def read_line(sock: socket.socket, limit: int = 256) -> bytes:
    """Bytes up to and including the first newline (or EOFError)."""
    out = bytearray()
    while not out.endswith(b"\n"):
        if len(out) >= limit:
            raise ValueError(f"no newline in the first {limit} bytes: {bytes(out)!r}")
        out += recv_exact(sock, 1)
    return bytes(out)


def reached_port(
    port: int, payload: bytes = b"", timeout: float = 5.0, host: str = LOOPBACK
) -> int:
    """Connect to ``host:port`` (through Portunus), read the origin's port line,
    check ``payload`` echoes, close; returns the origin port that answered."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        origin_port = int(read_line(s))
        if payload:
            s.sendall(payload)
            assert recv_exact(s, len(payload)) == payload
    return origin_port


class UdpPortEcho:
    """UDP echo on every port in ``ports``; replies are ``b"<port>:" + data``."""

    def __init__(self, ports: list[int], host: str = LOOPBACK) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.received: dict[int, int] = dict.fromkeys(ports, 0)  # port -> payload bytes
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for p in ports:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((host, p))
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, p)
            self.socks.append(s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="udp-port-echo")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.sel.select(0.1):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                with contextlib.suppress(BlockingIOError, OSError):
                    data, addr = s.recvfrom(65536)
                    self.received[key.data] += len(data)
                    s.sendto(f"{key.data}:".encode() + data, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks:
            s.close()
        self.sel.close()


def udp_exchange(port: int, payload: bytes, timeout: float = 2.0, tries: int = 5) -> bytes:
    """Send one datagram to ``port`` and return the reply (resends on loss)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout / tries)
        s.connect((LOOPBACK, port))
        for _ in range(tries):
            s.send(payload)
            try:
                return s.recv(65536)
            except TimeoutError:
                continue
    raise AssertionError(f"no UDP reply from port {port} within {timeout}s")


def bindable(port: int, proto: str = "tcp", host: str = LOOPBACK) -> bool:
    """True if a plain socket (no SO_REUSEADDR/SO_REUSEPORT) can bind ``port`` now:
    then no socket of anyone's is bound there (a leftover reuseport listener of
    Portunus would make this bind fail)."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        if proto == "tcp":
            s.listen(1)
    return True


class StreamListener(Origin):
    """An ``Origin`` on any loopback address/family running ``handler(conn)`` per
    connection (each with a 10 s socket timeout); ``accepted`` counts them."""

    def __init__(self, host: str, port: int, handler: Callable[[socket.socket], None]) -> None:
        def run(conn: socket.socket, rec: ConnRecord) -> None:
            conn.settimeout(10)
            handler(conn)

        super().__init__(run, port=port, backlog=128, host=host)

    @property
    def accepted(self) -> int:
        return len(self.records)
