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
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from portunus import logs
from portunus.rules import Target, build_rule
from portunus.shard import pumps
from portunus.shard.runtime import RuleRuntime, ShardContext
from portunus.shard.tcp import TcpConnection

pytestmark = pytest.mark.skipif(not pumps.HAVE_SPLICE, reason="no os.splice on this platform")


def listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    errors: list[dict[str, Any]] = []
    lp.set_exception_handler(lambda _lp, ctx: errors.append(ctx))
    lp.errors = errors  # type: ignore[attr-defined]
    yield lp
    lp.close()


def closed_by_peer(s: socket.socket) -> bool:
    """EOF, or a reset (the unread "hello" makes the kernel send RST on close)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def run_until(loop: asyncio.AbstractEventLoop, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached")
            await asyncio.sleep(0.01)

    loop.run_until_complete(poll())


def test_pipe_emfile_fails_the_connection_cleanly(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(logs._state, "format", "json")
    origin, front = listener(), listener()
    rule = build_rule(id=f"pipe-{os.getpid()}", protocol="tcp", listen=(1, 1),
                      targets=[Target(host="127.0.0.1", port=origin.getsockname()[1])])
    ctx = ShardContext(loop, {"use_splice": True, "splice_after": 0})  # splice from the first byte
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


def relay(loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch, splice_after: int,
          up: bytes, down: bytes, origin_delay: float = 0.0,
          while_running: Callable[[TcpConnection], bool] | None = None) -> dict[str, Any]:
    """Client sends ``up`` then half-closes; the origin reads to EOF (after
    ``origin_delay``), answers ``down`` and closes.  Returns what each end got."""
    pipes: list[int] = []
    real_pipe2 = os.pipe2

    def counting_pipe2(flags: int) -> tuple[int, int]:
        pipes.append(1)
        return real_pipe2(flags)

    monkeypatch.setattr(os, "pipe2", counting_pipe2)
    origin, front = listener(), listener()
    rule = build_rule(id=f"copy-{os.getpid()}", protocol="tcp", listen=(1, 1),
                      targets=[Target(host="127.0.0.1", port=origin.getsockname()[1])])
    ctx = ShardContext(loop, {"use_splice": True, "splice_after": splice_after})
    rt = RuleRuntime(ctx, rule)
    before = counted(rt)  # the meters are process-wide, keyed by rule id
    client = socket.create_connection(front.getsockname(), timeout=10)
    accepted, _ = front.accept()
    accepted.setblocking(False)
    conn = TcpConnection(ctx, rt, accepted, 0)
    conn.start()
    got: dict[str, Any] = {}

    def client_side() -> None:
        client.sendall(up)
        client.shutdown(socket.SHUT_WR)
        got["client"] = recv_all(client)

    def origin_side() -> None:
        s, _ = origin.accept()
        s.settimeout(10)
        time.sleep(origin_delay)
        got["origin"] = recv_all(s)  # EOF here = the client's half-close was passed on
        s.sendall(down)
        s.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (client_side, origin_side)]
    for t in threads:
        t.start()
    if while_running is not None:
        run_until(loop, lambda: while_running(conn))
    run_until(loop, lambda: conn.closed, timeout=20)
    for t in threads:
        t.join(10)
    assert loop.errors == []  # type: ignore[attr-defined]
    assert rt.conns == set()
    got["pipes"] = len(pipes)
    after = counted(rt)
    got["counted"] = (after[0] - before[0], after[1] - before[1])
    for s in (client, origin, front):
        s.close()
    ctx.poller.close()
    return got


def test_short_connection_is_copied_without_a_pipe(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    up, down = os.urandom(700), os.urandom(3000)
    got = relay(loop, monkeypatch, 64 * 1024, up, down)
    assert got["origin"] == up and got["client"] == down
    assert got["pipes"] == 0
    assert got["counted"] == (700, 3000)


def test_relay_switches_to_splice_after_the_threshold(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    up, down = os.urandom(3 * 1024 * 1024 + 7), os.urandom(2 * 1024 * 1024 + 5)
    got = relay(loop, monkeypatch, 64 * 1024, up, down)
    assert got["origin"] == up and got["client"] == down
    assert got["pipes"] >= 1  # both directions went past 64 KiB: a pipe was taken
    assert got["counted"] == (len(up), len(down))


def test_splice_after_zero_splices_from_the_first_byte(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    up, down = os.urandom(10), os.urandom(20)
    got = relay(loop, monkeypatch, 0, up, down)
    assert got["origin"] == up and got["client"] == down
    assert got["pipes"] >= 1
    assert got["counted"] == (10, 20)


def test_copy_phase_holds_bytes_while_the_target_is_full(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """The origin does not read for a while: the copy phase must stop reading the
    client (backpressure) with the unsent rest held, then deliver every byte."""
    up, down = os.urandom(16 * 1024 * 1024), os.urandom(100)
    seen_held: list[int] = []

    def held(conn: TcpConnection) -> bool:
        if conn.pumps is not None and conn.pumps[0].held:
            seen_held.append(len(conn.pumps[0].held))
            assert not conn.pumps[0].reading  # not reading the client while held
            return True
        return False

    got = relay(loop, monkeypatch, 1 << 30, up, down, origin_delay=0.5, while_running=held)
    assert seen_held
    assert got["origin"] == up and got["client"] == down
    assert got["pipes"] == 0  # never crossed the (huge) threshold
    assert got["counted"] == (len(up), len(down))


def test_splice_after_env_parsing() -> None:
    assert pumps.splice_after_from_env(None) == pumps.DEFAULT_SPLICE_AFTER
    assert pumps.splice_after_from_env("0") == 0
    assert pumps.splice_after_from_env("131072") == 131072
    assert pumps.splice_after_from_env("-1") == pumps.DEFAULT_SPLICE_AFTER
    assert pumps.splice_after_from_env("64k") == pumps.DEFAULT_SPLICE_AFTER
