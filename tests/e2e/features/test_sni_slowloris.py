"""Slowloris on an SNI port: 2,000 connections dripping a ClientHello one byte a
second cannot starve a normal client, and every one of them is closed once the
5 s ClientHello deadline passes (the shard's fds go back to where they were).

The HTTP API and the edge gateway have their own pre-auth limits and tests; this
covers the data plane's SNI peek, which the operator's users reach directly.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import socket
import ssl
import time

import psutil
import pytest

from tests.e2e.features.helpers import port_reporter, read_line
from tests.e2e.support import LOOPBACK, wait_for

SLOW = 2000
NAME = "a.example.test"


def client_hello(server_hostname: str) -> bytes:
    """The first flight OpenSSL sends for ``server_hostname`` (no server needed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def normal_visit(port: int, hello: bytes) -> float:
    """Seconds until the origin behind the SNI route answered a full ClientHello."""
    t0 = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.sendall(hello)
        int(read_line(s))
    return time.monotonic() - t0


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError as exc:
        return exc.errno in (errno.ECONNRESET, errno.EPIPE)


@pytest.fixture
def many_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = SLOW + 512
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))


def test_slow_client_hellos_cannot_starve_an_sni_port(standalone, origin, ports, many_fds) -> None:  # type: ignore[no-untyped-def]
    org = origin(port_reporter)
    port = ports.port()
    proc = standalone([{"name": "sni", "listen_port": port, "sni": NAME, "target": org.address}])
    hello = client_hello(NAME)
    [shard] = proc.shards().values()
    assert normal_visit(port, hello) < 1.0
    # After a first visit: the splice path keeps a small pipe pool once used.
    baseline = wait_for(lambda: shard.num_fds(), 2)

    slow: list[socket.socket] = []
    try:
        for _ in range(SLOW):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((LOOPBACK, port))
            slow.append(s)
        started = time.monotonic()
        visits: list[float] = []
        peak_fds = 0
        sent = 0
        # Drip one byte of the hello per connection per second for 6 s, and visit
        # normally in between: the drip outlives the 5 s ClientHello deadline.
        while time.monotonic() - started < 6.0:
            if sent < len(hello) - 1 and time.monotonic() - started >= sent:
                for s in slow:
                    with contextlib.suppress(OSError):
                        s.send(hello[sent : sent + 1])
                sent += 1
            visits.append(normal_visit(port, hello))
            peak_fds = max(peak_fds, shard.num_fds())
            time.sleep(0.1)
        assert peak_fds >= baseline + SLOW * 0.9, (
            f"the slow connections were not all accepted ({peak_fds})"
        )
        assert len(visits) >= 20
        assert max(visits) < 1.0, (
            f"a normal client waited {max(visits):.2f} s (all: {sorted(visits)[-5:]})"
        )
        # Every slow connection is cut by the ClientHello deadline (5 s + a timer tick).
        wait_for(
            lambda: sum(closed(s) for s in slow) == SLOW,
            6,
            what=lambda: (
                f"all {SLOW} slow connections closed ({sum(closed(s) for s in slow)} so far)"
            ),
        )
        assert time.monotonic() - started < 13.0
    finally:
        for s in slow:
            s.close()
    wait_for(
        lambda: shard.num_fds() <= baseline + 2,
        10,
        what=lambda: f"shard fds back to {baseline} (now {shard.num_fds()})",
    )
    assert normal_visit(port, hello) < 1.0
    assert psutil.Process(proc.pid).is_running()
