"""The origin of the SNI benchmark: a TLS sink and a raw sink that read and discard.

Run as a script: ``python bench/tls_sink.py TLS_PORT RAW_PORT CERT KEY``.

Both speak the same tiny protocol, so the client can time what actually arrived:
an 8-byte big-endian length N, then N bytes, which the sink reads and drops, then
the sink answers the 8-byte count it read.  On TLS_PORT that runs inside a real TLS
session (the handshake completes with CERT/KEY); on RAW_PORT the client first sends
a real TLS ClientHello record (so an SNI forwarder can route it), which the sink
skips, then the length and the bytes in the clear.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import struct
import sys
import threading

BUF = 1 << 20
_LEN = struct.Struct("!Q")


def read_exact(recv_into: object, view: memoryview, n: int) -> None:
    """Fill view[:n] from ``recv_into`` (a socket's or SSL socket's method)."""
    got = 0
    while got < n:
        k = recv_into(view[got:n])  # type: ignore[operator]
        if not k:
            raise ConnectionError("peer closed early")
        got += k


def drain(recv_into: object, n: int) -> int:
    """Read and discard ``n`` bytes; the count actually read."""
    buf = memoryview(bytearray(BUF))
    left = n
    while left:
        k = recv_into(buf[: min(BUF, left)])  # type: ignore[operator]
        if not k:
            break
        left -= k
    return n - left


def serve_raw(conn: socket.socket) -> None:
    head = memoryview(bytearray(8))
    read_exact(conn.recv_into, head, 5)  # TLS record header of the ClientHello
    (length,) = struct.unpack("!H", head[3:5])
    drain(conn.recv_into, length)
    read_exact(conn.recv_into, head, 8)
    (n,) = _LEN.unpack(head)
    conn.sendall(_LEN.pack(drain(conn.recv_into, n)))


def serve_tls(conn: socket.socket, ctx: ssl.SSLContext) -> None:
    tls = ctx.wrap_socket(conn, server_side=True)
    head = memoryview(bytearray(8))
    read_exact(tls.recv_into, head, 8)
    (n,) = _LEN.unpack(head)
    tls.sendall(_LEN.pack(drain(tls.recv_into, n)))
    with contextlib.suppress(OSError, ssl.SSLError):
        tls.close()


def handle(conn: socket.socket, ctx: ssl.SSLContext | None) -> None:
    with conn:
        with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
            if ctx is None:
                serve_raw(conn)
            else:
                serve_tls(conn, ctx)


def accept_loop(lsock: socket.socket, ctx: ssl.SSLContext | None) -> None:
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=handle, args=(conn, ctx), daemon=True).start()


def listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    return s


def main() -> None:
    tls_port, raw_port, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=accept_loop, args=(listener(raw_port), None), daemon=True).start()
    accept_loop(listener(tls_port), ctx)


if __name__ == "__main__":
    main()
