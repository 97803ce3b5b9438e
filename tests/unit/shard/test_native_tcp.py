"""A plain TCP port served natively (native_tcp.py + _relay.c) on a real uvloop loop.

Accept, connect through the candidates (fall-through, timeout), relay, and the
batched reports turned into the same metrics and health updates the Python path
makes; stopping the handler keeps open connections; the drain closes them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import threading
import time
from typing import Any

import pytest

from portunus import logs
from portunus.rules import Target, build_rule
from portunus.shard import metrics as m
from portunus.shard.native_tcp import NativeTcpHandler, eligible
from portunus.shard.runtime import RuleRuntime, ShardContext

from .. import loopkit
from ..fdwait import readable
from ..loopkit import LOOPBACK, listener, new_loop

try:
    from portunus.shard import _relay  # noqa: F401
except ImportError:
    pytest.skip(
        "the native relay is not built (no C compiler at install time)", allow_module_level=True
    )

_ids = iter(range(1_000_000))


@pytest.fixture(autouse=True, params=["thread", "loop"])
def relay_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: the relay's own thread (the default) and driven from the loop."""
    monkeypatch.setenv("PORTUNUS_NATIVE_THREAD", "1" if request.param == "thread" else "0")
    return str(request.param)


loop = pytest.fixture(new_loop)
# The native path's conditions get longer than loopkit's default: threads and C reports.
run_until = functools.partial(loopkit.run_until, timeout=10.0)


def closed_port() -> int:
    s = listener()
    port = s.getsockname()[1]
    s.close()
    return port


class Port:
    """One native listener for a rule with ``targets`` (ports), plus its meters."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, ports: list[int], timeout: float = 5.0
    ) -> None:
        self.loop = loop
        self.rule = build_rule(
            id=f"native-{next(_ids)}",
            protocol="tcp",
            listen=(1, 1),
            targets=[Target(host=LOOPBACK, port=p, priority=i + 1) for i, p in enumerate(ports)],
        )
        self.ctx = ShardContext(loop, {"use_splice": True, "connect_timeout_secs": timeout})
        self.rt = RuleRuntime(self.ctx, self.rule)
        assert eligible(self.ctx, self.rt)
        self.lsock = listener()
        self.lsock.setblocking(False)
        self.handler = NativeTcpHandler(self.ctx, self.rt, 0, self.lsock)
        self.handler.start()

    @property
    def addr(self) -> tuple[str, int]:
        return self.lsock.getsockname()

    def value(self, metric: Any, *labels: str) -> float:
        """A rule meter by name ("active"), or a per-target metric with its target label."""
        if isinstance(metric, str):
            return getattr(self.rt.meters, metric)._value.get()  # type: ignore[no-any-return]
        return metric.labels(self.rule.client, self.rule.id, *labels)._value.get()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.handler.close()
        self.lsock.close()
        self.ctx._native.shutdown()


def serve_once(origin: socket.socket, reply: bytes, got: list[bytes]) -> threading.Thread:
    """Origin thread: accept one connection, read to EOF, answer, close."""

    def run() -> None:
        s, _ = origin.accept()
        s.settimeout(10)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        got.append(b"".join(chunks))
        s.sendall(reply)
        s.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def request(loop: asyncio.AbstractEventLoop, addr: tuple[str, int], data: bytes) -> bytes:
    """Client: send, half-close, read the answer to EOF (the loop runs meanwhile)."""
    out: list[bytes] = []

    def run() -> None:
        c = socket.create_connection(addr, timeout=10)
        chunks = []
        try:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            while chunk := c.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass  # closed by the relay (no target): a reset, EPIPE or ENOTCONN by timing
        out.append(b"".join(chunks))
        c.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    run_until(loop, lambda: not t.is_alive())
    return out[0]


def test_relays_and_counts_like_the_python_path(loop: asyncio.AbstractEventLoop) -> None:
    origin = listener()
    p = Port(loop, [origin.getsockname()[1]])
    got: list[bytes] = []
    serve_once(origin, b"r" * 200_000, got)
    assert request(loop, p.addr, b"q" * 70_000) == b"r" * 200_000
    assert got == [b"q" * 70_000]
    run_until(loop, lambda: p.value("active") == 0 and p.handler.live == 0)
    assert p.value("connections") == 1
    assert (p.value("bytes_in"), p.value("bytes_out")) == (70_000, 200_000)
    assert p.value(m.TARGET_CONNECTIONS, p.rule.targets[0].label) == 1
    assert p.rt.conns == set()
    assert loop.errors == []  # type: ignore[attr-defined]
    p.close()
    origin.close()


def test_refused_target_falls_through_to_the_next(
    loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(logs._state, "format", "json")
    origin = listener()
    dead = closed_port()
    p = Port(loop, [dead, origin.getsockname()[1]])
    got: list[bytes] = []
    serve_once(origin, b"ok", got)
    assert request(loop, p.addr, b"hi") == b"ok"
    run_until(loop, lambda: p.handler.live == 0)
    assert p.value(m.TARGET_FAILURES, p.rule.targets[0].label) == 1
    assert p.value(m.TARGET_CONNECTIONS, p.rule.targets[1].label) == 1
    assert p.value("connect_failures") == 0
    events = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    assert [(e["event"], e["error"]) for e in events if e["event"] == "tcp.connect_failed"] == [
        ("tcp.connect_failed", "ECONNREFUSED")
    ]
    p.close()
    origin.close()


def test_no_target_accepting_closes_the_client(loop: asyncio.AbstractEventLoop) -> None:
    p = Port(loop, [closed_port(), closed_port()])
    assert request(loop, p.addr, b"hi") == b""
    run_until(loop, lambda: p.value("connect_failures") == 1 and p.handler.live == 0)
    assert p.value("active") == 0 and p.value("connections") == 1
    assert [p.value(m.TARGET_FAILURES, t.label) for t in p.rule.targets] == [1, 1]
    p.close()


def test_unanswered_connect_times_out_into_the_backup(
    loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(logs._state, "format", "json")
    hole = listener(backlog=0)  # its accept queue is filled below: SYNs go unanswered
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.settimeout(0.3)
        try:
            c.connect(hole.getsockname())
        except TimeoutError:
            c.close()
            break
        fillers.append(c)
    origin = listener()
    p = Port(loop, [hole.getsockname()[1], origin.getsockname()[1]], timeout=0.3)
    got: list[bytes] = []
    serve_once(origin, b"late but fine", got)
    t0 = time.monotonic()
    assert request(loop, p.addr, b"x") == b"late but fine"
    assert 0.25 <= time.monotonic() - t0 < 3.0
    events = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    assert [e["error"] for e in events if e["event"] == "tcp.connect_failed"] == ["timeout"]
    p.close()
    for s in (hole, origin, *fillers):
        s.close()


def test_stopping_the_handler_keeps_open_connections(loop: asyncio.AbstractEventLoop) -> None:
    """A rule update moves the port to a new handler: the open relay carries on."""
    origin = listener()
    p = Port(loop, [origin.getsockname()[1]])
    client = socket.create_connection(p.addr, timeout=10)
    run_until(loop, lambda: p.handler.live == 1)
    up, _ = origin.accept()
    assert p.rt.conns == {p.handler.conns}  # counted while open, for the drain
    p.handler.close()  # stop accepting
    client.sendall(b"still here")
    run_until(loop, lambda: readable(up))
    assert up.recv(100) == b"still here"
    client.close()
    up.close()
    run_until(loop, lambda: p.handler.handle is None)  # forgotten once its last connection closed
    assert p.rt.conns == set() and p.value("active") == 0
    assert p.value("bytes_in") == len(b"still here")
    p.lsock.close()
    p.ctx._native.shutdown()
    origin.close()


def test_drain_timeout_closes_native_connections(loop: asyncio.AbstractEventLoop) -> None:
    origin = listener()
    p = Port(loop, [origin.getsockname()[1]])
    drained: list[Any] = []
    p.ctx.on_drained = drained.append
    client = socket.create_connection(p.addr, timeout=10)
    run_until(loop, lambda: p.handler.live == 1)
    up, _ = origin.accept()
    p.rt.draining = True
    p.rt.close_all()  # what Shard._force_drain does
    assert drained == [p.rt] and p.rt.conns == set()
    assert client.recv(10) == b"" and up.recv(10) == b""
    assert p.value("active") == 0
    p.close()
    for s in (client, up, origin):
        s.close()


def test_out_of_fds_at_accept_backs_off_then_serves(
    loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """accept4 fails with EMFILE: logged, the listener rests (100 ms, a timerfd tick
    resumes it), and the waiting client is served once fds are back."""
    import gc
    import os
    import resource

    monkeypatch.setitem(logs._state, "format", "json")
    origin = listener()
    p = Port(loop, [origin.getsockname()[1]])
    native = p.ctx.native
    got: list[bytes] = []
    server = serve_once(origin, b"served", got)
    client = socket.socket()  # its fd exists before the fds run out
    client.settimeout(10)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    # Sockets earlier tests left to the GC must not be freed while the fds are out: the
    # relay thread would take the freed fds at once.
    gc.collect()
    try:
        top = max(int(x) for x in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        # Connected only now: the relay thread would accept it at once before.
        client.connect(p.addr)  # queued in the kernel's backlog
        # Drive the relay by hand: running the loop itself would need fds.
        assert readable(native.relay.fileno(), 5)
        native.dispatch()
        assert p.handler.live == 0  # nothing accepted: the client waits in the queue
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    client.sendall(b"q")
    client.shutdown(socket.SHUT_WR)
    run_until(loop, lambda: not server.is_alive())
    client.settimeout(10)
    run_until(loop, lambda: readable(client))
    assert client.recv(100) == b"served" and got == [b"q"]
    events = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    assert "tcp.accept_error" in [e["event"] for e in events]
    client.close()
    p.close()
    origin.close()


def test_a_rule_with_an_idle_timeout_keeps_the_python_relay(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """The native relay keeps no idle clock: a rule with idle_timeout_secs must not
    be served natively, or its idle connections would never be closed."""
    ctx = ShardContext(loop, {"use_splice": True, "connect_timeout_secs": 5.0})
    targets = [Target(host=LOOPBACK, port=9, priority=1)]
    plain = build_rule(id=f"native-{next(_ids)}", protocol="tcp", listen=(1, 1), targets=targets)
    idle = build_rule(
        id=f"native-{next(_ids)}",
        protocol="tcp",
        listen=(1, 1),
        targets=targets,
        idle_timeout_secs=30,
    )
    assert eligible(ctx, RuleRuntime(ctx, plain))
    rt = RuleRuntime(ctx, idle)
    try:
        assert not eligible(ctx, rt)
    finally:
        if rt.idle_timer is not None:
            rt.idle_timer.cancel()


def test_busy_port_counts_are_held_back_at_most_report_ms() -> None:
    """report_ms: a port with open connections reports opens in one batch per report_ms,
    delivered by the relay's own tick even when nothing else happens; never early."""

    from portunus.shard._relay import Relay

    with pytest.raises(ValueError):
        Relay(report_ms=101)  # beyond the 100 ms the metrics may lag
    origin = listener()
    relay = Relay(report_ms=100)
    lsock = listener()
    lsock.setblocking(False)
    token = object()
    relay.listen(lsock.fileno(), token, 1, [(LOOPBACK, origin.getsockname()[1], 0)], 5.0)

    def until(key: int, n: int) -> list[tuple[float, int]]:
        """(when, count) of reports until field ``key`` (1 opened, 2 closed) sums to n."""
        seen: list[tuple[float, int]] = []
        deadline = time.monotonic() + 10
        while sum(k for _, k in seen) < n and time.monotonic() < deadline:
            readable(relay.fileno(), 0.5)
            for rep in relay.poll()[1]:
                assert rep[0] is token
                if rep[key]:
                    seen.append((time.monotonic(), rep[key]))
        return seen

    first = socket.create_connection(lsock.getsockname(), timeout=10)
    [(t0, _)] = until(1, 1)  # the port's first connection goes out at once
    second = socket.create_connection(lsock.getsockname(), timeout=10)
    [(t1, _)] = until(1, 1)  # ...the next one waits for report_ms, then the tick sends it
    assert t1 - t0 >= 0.09  # held back (clock steps are whole milliseconds)
    assert t1 - t0 < 2.0  # and delivered without further traffic
    origin.settimeout(10)
    for s in (first, second, origin.accept()[0], origin.accept()[0]):
        s.close()
    assert sum(k for _, k in until(2, 2)) == 2  # the last close (live 0) is reported
    # An idle port's next connection is news at once: Python must not believe the
    # port idle (forget_listener, the drain) while the relay holds a connection.
    t2 = time.monotonic()
    third = socket.create_connection(lsock.getsockname(), timeout=10)
    [(t3, _)] = until(1, 1)
    assert t3 - t2 < 0.09
    third.close()
    relay.close_all()
    for s in (lsock, origin):
        s.close()


def test_stopping_while_an_accept_is_unreported_waits_for_that_connection(
    loop: asyncio.AbstractEventLoop, relay_mode: str
) -> None:
    """The relay's thread may accept after the last report Python read: stopping the
    port then (a shard's SIGTERM) must not take it for idle and forget the listener;
    the connection's report and its close finish the drain."""
    origin = listener()
    p = Port(loop, [origin.getsockname()[1]])
    client = socket.create_connection(p.addr, timeout=10)
    if relay_mode == "thread":
        assert readable(origin, 10)  # the thread accepted and connected on its own
        assert p.handler.live == 0  # what Python knows: nothing reported yet
    else:
        run_until(loop, lambda: readable(origin))  # the loop drives the relay
    origin.settimeout(10)
    upstream, _ = origin.accept()
    p.handler.close()  # stop accepting, as the shard's stop does; must not raise
    run_until(loop, lambda: p.handler.live == 1)
    assert p.handler.handle is not None and p.handler.conns in p.rt.conns
    client.close()
    upstream.close()
    run_until(loop, lambda: p.handler.live == 0 and p.handler.handle is None)
    assert p.rt.conns == set()
    assert loop.errors == []  # type: ignore[attr-defined]
    p.lsock.close()
    p.ctx._native.shutdown()
    origin.close()
