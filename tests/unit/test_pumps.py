"""The splice path when the process is out of fds for a pipe (EMFILE/ENFILE).

A real TcpConnection on a uvloop loop over loopback sockets: the client sends,
the first splice needs a pipe, pipe2() fails.  The connection must end cleanly
(both sides closed, counted, logged) instead of raising out of the loop callback
and leaving the client hanging.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
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
    ctx = ShardContext(loop, {"use_splice": True})
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
