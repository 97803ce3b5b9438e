"""Client-side byte streams: reproducible payloads (``Pattern``), their checksums
(``Digest``), and blocking socket helpers that send, receive and connect."""

from __future__ import annotations

import hashlib
import random
import socket
from collections.abc import Iterator

from .ports import LOOPBACK

KiB = 1024
MiB = 1024 * 1024


class Digest:
    """Running byte count and SHA-256 of a stream."""

    __slots__ = ("count", "h")

    def __init__(self) -> None:
        self.count = 0
        self.h = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        self.count += len(data)
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


class Pattern:
    """A reproducible pseudo-random payload of ``size`` bytes (no period that a
    relay could hide a dropped, duplicated or reordered chunk behind)."""

    def __init__(self, size: int, seed: int = 1, chunk: int = 256 * KiB) -> None:
        self.size = size
        self.seed = seed
        self.chunk = chunk

    def chunks(self) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        left = self.size
        while left > 0:
            n = min(self.chunk, left)
            left -= n
            yield rng.randbytes(n)

    def digest(self) -> str:
        d = Digest()
        for c in self.chunks():
            d.update(c)
        return d.hexdigest()


def send_pattern(sock: socket.socket, pattern: Pattern, digest: Digest | None = None) -> Digest:
    """sendall every chunk of ``pattern``; returns the digest of what was sent."""
    d = digest or Digest()
    for chunk in pattern.chunks():
        sock.sendall(chunk)
        d.update(chunk)
    return d


def recv_all(
    sock: socket.socket,
    digest: Digest | None = None,
    limit: int | None = None,
    bufsize: int = 256 * KiB,
) -> Digest:
    """Read until EOF (or ``limit`` bytes) into a digest."""
    d = digest or Digest()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    while limit is None or d.count < limit:
        want = bufsize if limit is None else min(bufsize, limit - d.count)
        n = sock.recv_into(view[:want])
        if n == 0:
            break
        d.update(view[:n])
    return d


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes or raise EOFError."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def connect(
    port: int, timeout: float = 5.0, host: str = LOOPBACK, rcvbuf: int | None = None
) -> socket.socket:
    """A blocking client socket connected to ``host:port``."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def echo_roundtrip(port: int, payload: bytes = b"ping\n", timeout: float = 5.0) -> bool:
    """Connect, send ``payload``, expect it echoed back; True when it was."""
    with connect(port, timeout) as s:
        s.sendall(payload)
        return recv_exact(s, len(payload)) == payload
