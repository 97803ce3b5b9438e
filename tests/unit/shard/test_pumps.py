"""The relay pumps on a real TcpConnection over loopback sockets (uvloop loop).

Out of fds for a pipe (EMFILE/ENFILE): the first splice needs a pipe, pipe2()
fails.  The connection must end cleanly (both sides closed, counted, logged)
instead of raising out of the loop callback and leaving the client hanging.

Copy first, then splice: a relay copies its first ``splice_after`` bytes each way
through the shard's shared buffer and takes a pipe only after that, with the same
half-close, backpressure and byte counting as the spliced path.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import threading
import time
from typing import Any

import pytest

from portunus import logs
from portunus.rules import Target, build_rule
from portunus.shard import pumps
from portunus.shard.runtime import RuleRuntime, ShardContext
from portunus.shard.tcp import TcpConnection

from ..fdwait import readable
from ..loopkit import listener, new_loop, run_until

pytestmark = pytest.mark.skipif(not pumps.HAVE_SPLICE, reason="no os.splice on this platform")


loop = pytest.fixture(new_loop)


def closed_by_peer(s: socket.socket) -> bool:
    """EOF, or a reset (the unread "hello" makes the kernel send RST on close)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def test_pipe_emfile_fails_the_connection_cleanly(
    loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(logs._state, "format", "json")
    origin, front = listener(8), listener(8)
    rule = build_rule(
        id=f"pipe-{os.getpid()}",
        protocol="tcp",
        listen=(1, 1),
        targets=[Target(host="127.0.0.1", port=origin.getsockname()[1])],
    )
    # The Python relay, splicing from the first byte.
    ctx = ShardContext(loop, {"use_splice": True, "splice_after": 0, "native": False})
    rt = RuleRuntime(ctx, rule)
    assert rt.limiter_in is None  # the splice path is the one under test

    def no_fds(flags: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pipe2", no_fds)
    client = socket.create_connection(front.getsockname(), timeout=5)
    accepted, _ = front.accept()
    accepted.setblocking(False)
    conn = TcpConnection(ctx, rt, accepted, 0)
    conn.start()
    run_until(loop, lambda: conn.pumps is not None)
    upstream, _ = origin.accept()
    upstream.settimeout(5)
    client.sendall(b"hello")
    run_until(loop, lambda: conn.closed)

    assert loop.errors == []  # type: ignore[attr-defined]
    assert ctx.pipes.failures == 1
    assert rt.conns == set()
    assert closed_by_peer(client)  # the client is told, not left hanging
    assert upstream.recv(100) == b""  # and the target side is closed too
    events = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    assert [e["event"] for e in events if e["event"] == "tcp.pipe_failed"] == ["tcp.pipe_failed"]
    for s in (client, upstream, origin, front):
        s.close()


def test_pipe_pool_counts_only_failed_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = pumps.PipePool()
    r, w = pool.get()
    pool.put((r, w), clean=True)
    assert pool.get() == (r, w) and pool.failures == 0
    pool.put((r, w), clean=False)

    def no_fds(flags: int) -> tuple[int, int]:
        raise OSError(errno.ENFILE, os.strerror(errno.ENFILE))

    monkeypatch.setattr(os, "pipe2", no_fds)
    with pytest.raises(OSError):
        pool.get()
    assert pool.failures == 1


def counted(rt: RuleRuntime) -> tuple[float, float]:
    return rt.meters.bytes_in._value.get(), rt.meters.bytes_out._value.get()  # type: ignore[attr-defined]


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def recv_soon(loop: asyncio.AbstractEventLoop, s: socket.socket, n: int) -> bytes:
    """recv once the relay (which needs the loop running) has delivered something."""
    run_until(loop, lambda: readable(s))
    return s.recv(n)


def have_native() -> bool:
    try:
        from portunus.shard import _relay  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=["python", "native"])
def path(request: pytest.FixtureRequest) -> str:
    if request.param == "native" and not have_native():
        pytest.skip("the native relay is not built (no C compiler at install time)")
    return str(request.param)


def pooled_pipes(ctx: ShardContext) -> int:
    """Drained pipes the relay kept after its connections closed: > 0 = it spliced."""
    if ctx._native is not None:
        return int(ctx._native.relay.pooled_pipes)
    return len(ctx.pipes.free)


class Relayed:
    """A TcpConnection between a blocking client and origin socket, on ``path``'s relay."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str, splice_after: int) -> None:
        self.loop = loop
        self.origin_l, front = listener(), listener()
        rule = build_rule(
            id=f"copy-{os.getpid()}",
            protocol="tcp",
            listen=(1, 1),
            targets=[Target(host="127.0.0.1", port=self.origin_l.getsockname()[1])],
        )
        self.ctx = ShardContext(
            loop, {"use_splice": True, "splice_after": splice_after, "native": path == "native"}
        )
        self.rt = RuleRuntime(self.ctx, rule)
        self.before = counted(self.rt)  # the meters are process-wide, keyed by rule id
        self.client = socket.create_connection(front.getsockname(), timeout=10)
        accepted, _ = front.accept()
        front.close()
        accepted.setblocking(False)
        self.conn = TcpConnection(self.ctx, self.rt, accepted, 0)
        self.conn.start()
        run_until(loop, lambda: self.conn.pumps is not None or self.conn.native is not None)
        assert (self.conn.native is not None) == (path == "native")
        self.origin, _ = self.origin_l.accept()
        self.origin.settimeout(10)

    def counted(self) -> tuple[float, float]:
        after = counted(self.rt)
        return after[0] - self.before[0], after[1] - self.before[1]

    def finish(self) -> None:
        run_until(self.loop, lambda: self.conn.closed, timeout=20)
        assert self.loop.errors == []  # type: ignore[attr-defined]
        assert self.rt.conns == set()

    def close(self) -> None:
        for s in (self.client, self.origin, self.origin_l):
            s.close()
        if self.ctx._native is not None:
            self.ctx._native.shutdown()
        self.ctx.poller.close()


def exchange(
    loop: asyncio.AbstractEventLoop,
    path: str,
    splice_after: int,
    up: bytes,
    down: bytes,
    origin_delay: float = 0.0,
) -> dict[str, Any]:
    """Client sends ``up`` then half-closes; the origin reads to EOF (after
    ``origin_delay``), answers ``down`` and closes.  Returns what each end got."""
    r = Relayed(loop, path, splice_after)
    got: dict[str, Any] = {}

    def client_side() -> None:
        r.client.sendall(up)
        r.client.shutdown(socket.SHUT_WR)
        got["client"] = recv_all(r.client)

    def origin_side() -> None:
        time.sleep(origin_delay)
        got["origin"] = recv_all(r.origin)  # EOF here = the client's half-close was passed on
        r.origin.sendall(down)  # the other direction still flows after the half-close
        r.origin.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (client_side, origin_side)]
    for t in threads:
        t.start()
    r.finish()
    for t in threads:
        t.join(10)
    got["pipes"] = pooled_pipes(r.ctx)
    got["counted"] = r.counted()
    r.close()
    return got


def test_short_connection_is_copied_without_a_pipe(
    loop: asyncio.AbstractEventLoop, path: str
) -> None:
    up, down = os.urandom(700), os.urandom(3000)
    got = exchange(loop, path, 64 * 1024, up, down)
    assert got["origin"] == up and got["client"] == down
    assert got["pipes"] == 0
    assert got["counted"] == (700, 3000)


def test_relay_switches_to_splice_after_the_threshold(
    loop: asyncio.AbstractEventLoop, path: str
) -> None:
    up, down = os.urandom(3 * 1024 * 1024 + 7), os.urandom(2 * 1024 * 1024 + 5)
    got = exchange(loop, path, 64 * 1024, up, down)
    assert got["origin"] == up and got["client"] == down
    assert got["pipes"] >= 1  # both directions went past 64 KiB: a pipe was taken
    assert got["counted"] == (len(up), len(down))


def test_splice_after_zero_splices_from_the_first_byte(
    loop: asyncio.AbstractEventLoop, path: str
) -> None:
    up, down = os.urandom(10), os.urandom(20)
    got = exchange(loop, path, 0, up, down)
    assert got["origin"] == up and got["client"] == down
    assert got["pipes"] >= 1
    assert got["counted"] == (10, 20)


def test_small_messages_stay_copied_past_the_threshold(
    loop: asyncio.AbstractEventLoop, path: str
) -> None:
    """Ping-pong of 64-byte messages, far past splice_after: no read is bulk-sized,
    so no pipe is taken (small messages are cheaper copied)."""
    r = Relayed(loop, path, 1024)
    for i in range(200):  # 12.8 KiB each way
        msg = bytes([i]) * 64
        r.client.sendall(msg)
        assert recv_soon(loop, r.origin, 64) == msg
        r.origin.sendall(msg)
        assert recv_soon(loop, r.client, 64) == msg
    r.client.close()
    r.origin.close()
    r.finish()
    assert pooled_pipes(r.ctx) == 0
    assert r.counted() == (200 * 64, 200 * 64)
    r.close()


def test_late_origin_gets_everything_in_order(loop: asyncio.AbstractEventLoop, path: str) -> None:
    """The origin does not read for a while (EAGAIN on every send to it): nothing is lost."""
    up, down = os.urandom(24 * 1024 * 1024), os.urandom(100)
    got = exchange(loop, path, 1 << 30, up, down, origin_delay=0.5)
    assert got["origin"] == up and got["client"] == down
    assert got["pipes"] == 0  # never crossed the (huge) threshold
    assert got["counted"] == (len(up), len(down))


@pytest.mark.parametrize("splice_after", [0, 1 << 30])
def test_backpressure_bounds_what_the_relay_takes(
    loop: asyncio.AbstractEventLoop, path: str, splice_after: int
) -> None:
    """While the origin reads nothing the relay must stop reading the client: what the
    client manages to send stays around the sockets' buffers, not the whole stream."""
    r = Relayed(loop, path, splice_after)
    r.client.setblocking(False)
    block = os.urandom(1 << 20)
    sent, idle_since = 0, time.monotonic()
    while time.monotonic() - idle_since < 0.5 and sent < 256 << 20:
        try:
            sent += r.client.send(block)
            idle_since = time.monotonic()
        except BlockingIOError:
            loop.run_until_complete(asyncio.sleep(0.02))
    assert sent < 64 << 20, (
        f"the relay took {sent >> 20} MiB from a client whose origin reads nothing"
    )
    if path == "python" and splice_after:
        assert r.conn.pumps is not None and r.conn.pumps[0].held  # the unsent rest is held
    r.client.shutdown(socket.SHUT_WR)
    got: list[bytes] = []

    def origin_side() -> None:
        got.append(recv_all(r.origin))  # the loop runs meanwhile (r.finish)
        r.origin.close()

    reader = threading.Thread(target=origin_side, daemon=True)
    reader.start()
    r.finish()
    reader.join(10)
    assert len(got[0]) == sent and got[0][: len(block)] == block
    assert r.counted() == (sent, 0)
    r.close()


def test_reset_by_the_client_closes_both_sides(loop: asyncio.AbstractEventLoop, path: str) -> None:
    r = Relayed(loop, path, 64 * 1024)
    r.client.sendall(b"partial request")
    assert recv_soon(loop, r.origin, 100) == b"partial request"
    r.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST on close
    r.client.close()
    r.origin.sendall(b"x" * 1000)  # the relay's send to the reset client fails
    r.finish()
    try:
        assert recv_soon(loop, r.origin, 100) == b""
    except ConnectionResetError:
        pass
    assert r.counted()[0] == len(b"partial request")
    r.origin_l.close()
    r.origin.close()
    if r.ctx._native is not None:
        r.ctx._native.shutdown()


def test_closing_a_relayed_connection_from_python(
    loop: asyncio.AbstractEventLoop, path: str
) -> None:
    """A removed rule's drain timeout closes open relays: both sides see the close."""
    r = Relayed(loop, path, 64 * 1024)
    r.client.sendall(b"abc")
    assert recv_soon(loop, r.origin, 10) == b"abc"
    r.conn.close()
    assert r.rt.conns == set() and r.conn.native is None
    assert r.client.recv(10) == b"" and r.origin.recv(10) == b""
    assert r.counted() == (3, 0)  # the unreported bytes were counted at the close
    r.close()


def test_splice_after_env_parsing() -> None:
    assert pumps.splice_after_from_env(None) == pumps.DEFAULT_SPLICE_AFTER
    assert pumps.splice_after_from_env("0") == 0
    assert pumps.splice_after_from_env("131072") == 131072
    assert pumps.splice_after_from_env("-1") == pumps.DEFAULT_SPLICE_AFTER
    assert pumps.splice_after_from_env("64k") == pumps.DEFAULT_SPLICE_AFTER


def test_native_pipe_exhaustion_fails_the_connection_cleanly(
    loop: asyncio.AbstractEventLoop,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of fds when a native relay needs its first pipe: the connection is closed
    and counted, the loop is unharmed (the Python path's twin is the test above)."""
    if not have_native():
        pytest.skip("the native relay is not built")
    import resource

    monkeypatch.setitem(logs._state, "format", "json")
    r = Relayed(loop, "native", 0)  # splice from the first byte: the first read needs a pipe
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        top = max(int(x) for x in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        while True:  # fill the holes below the limit: pipe2() must find no free number
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        r.client.sendall(b"hello")
        # Drive the relay by hand: running the loop itself would need fds.
        native = r.ctx._native
        assert readable(native.relay.fileno(), 5)
        native.dispatch()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    r.finish()
    assert r.ctx._native.relay.pipe_failures == 1
    assert closed_by_peer(r.client) and r.origin.recv(100) == b""
    events = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    assert "tcp.pipe_failed" in [e["event"] for e in events]
    r.close()
