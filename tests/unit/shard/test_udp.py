"""UdpService on a real uvloop loop with real loopback sockets, without a supervisor.

The service loop runs in a background thread; the test drives plain blocking
client sockets and a threaded echo origin and polls metrics and state.  Metric
values are read from this process's registry (in-memory or multiprocess values
alike); every test uses its own rule id so counters never mix.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client import REGISTRY

from portunus.rules import Target, build_rule
from portunus.shard.runtime import RuleRuntime, ShardContext
from portunus.shard.udp import UdpService
from portunus.shard.udp_budget import FlowBudget

_ids = itertools.count()


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def metric(name: str, rule: str, **extra: str) -> float:
    labels = {"client": "local", "rule": rule, **extra}
    if "target" not in extra:
        labels["owner"] = ""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Echo:
    """A UDP origin on 127.0.0.1 that echoes and records (source, payload)."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[tuple[str, int], bytes]] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.seen.append((addr, data))
            self.sock.sendto(data, addr)

    def sources(self) -> set[tuple[str, int]]:
        return {a for a, _ in self.seen}

    def stop(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


class Harness:
    """A uvloop loop in a thread plus factories that clean up what they built."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cleanups: list[Callable[[], None]] = []

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the loop thread and return its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(5)

    def echo(self, port: int = 0) -> Echo:
        e = Echo(port)
        self.cleanups.append(e.stop)
        return e

    def client(self) -> socket.socket:
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind(("127.0.0.1", 0))
        c.settimeout(2.0)
        self.cleanups.append(c.close)
        return c

    def listener(self, port: int = 0) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.setblocking(False)
        self.cleanups.append(s.close)
        return s

    def services(
        self, targets: list[Target], *, ports: int = 1, idle: float = 60.0, max_flows: int = 1024
    ) -> tuple[str, list[UdpService], list[socket.socket]]:
        """Start a UDP rule with ``ports`` consecutive listen ports, one service each."""
        listeners = self._consecutive_listeners(ports)
        lo = listeners[0].getsockname()[1]
        rid = f"u{os.getpid()}-{next(_ids)}"
        rule = build_rule(id=rid, protocol="udp", listen=(lo, lo + ports - 1), targets=targets)
        settings = {
            "udp_flow_idle_secs": idle,
            "udp_max_flows": max_flows,
            "shards": 1,
            "runtime_dir": str(self.tmp),
            "client": "local",
        }
        ctx = ShardContext(self.loop, settings)
        rt = RuleRuntime(ctx, rule)
        svcs = [UdpService(ctx, rt, s, i) for i, s in enumerate(listeners)]
        for svc in svcs:
            self.call(svc.start)
            self.cleanups.append(lambda svc=svc: self.call(svc.close))
        return rid, svcs, listeners

    def _consecutive_listeners(self, n: int) -> list[socket.socket]:
        for _ in range(50):
            first = self.listener()
            lo = first.getsockname()[1]
            socks = [first]
            try:
                for p in range(lo + 1, lo + n):
                    socks.append(self.listener(p))
            except OSError:
                continue
            return socks
        raise AssertionError("no run of free consecutive UDP ports")

    def close(self) -> None:
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception:  # noqa: BLE001 - best-effort teardown
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def local(port: int, prio: int = 1, host: str = "127.0.0.1") -> Target:
    return Target(host=host, port=port, priority=prio)


def dead_port() -> int:
    """A UDP port with nobody bound: datagrams to it draw ICMP port unreachable."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


# ---------------------------------------------------------------------- tests


def test_each_client_gets_only_its_own_replies(h: Harness) -> None:
    echo = h.echo()
    rid, _svcs, (lsock,) = h.services([local(echo.port)])
    addr = lsock.getsockname()
    clients = [h.client() for _ in range(3)]
    for j in range(5):
        for i, c in enumerate(clients):
            c.sendto(f"c{i}-{j}".encode(), addr)
    for i, c in enumerate(clients):
        got = sorted(c.recvfrom(100)[0] for _ in range(5))
        assert got == sorted(f"c{i}-{j}".encode() for j in range(5))
    # One upstream socket per client: each origin-side source carries one client only.
    by_source: dict[tuple[str, int], set[str]] = {}
    for src, data in echo.seen:
        by_source.setdefault(src, set()).add(data.decode().split("-")[0])
    assert len(by_source) == 3
    assert all(len(v) == 1 for v in by_source.values())
    assert metric("portunus_udp_flows_active", rid) == 3
    assert metric("portunus_rule_active_connections", rid) == 3
    assert metric("portunus_rule_connections_total", rid) == 3


def test_idle_flow_is_reaped_but_a_busy_one_is_not(h: Harness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)], idle=0.3)
    addr = lsock.getsockname()
    busy, idle = h.client(), h.client()
    idle.sendto(b"once", addr)
    assert idle.recvfrom(100)[0] == b"once"
    # Keep one flow busy for 4x the idle time; only the quiet one may go.
    end = time.monotonic() + 1.2
    while time.monotonic() < end:
        busy.sendto(b"tick", addr)
        assert busy.recvfrom(100)[0] == b"tick"
        time.sleep(0.05)
    assert h.call(lambda: sorted(svc.flows)) == [busy.getsockname()]
    assert metric("portunus_udp_flows_active", rid) == 1
    first_sources = echo.sources()
    assert len(first_sources) == 2
    wait_for(lambda: metric("portunus_udp_flows_active", rid) == 0, what="busy flow reaped")
    assert metric("portunus_rule_active_connections", rid) == 0
    # The client comes back: a new flow with a new upstream socket.
    idle.sendto(b"again", addr)
    assert idle.recvfrom(100)[0] == b"again"
    assert metric("portunus_rule_connections_total", rid) == 3
    assert len(echo.sources() - first_sources) == 1


def test_overflow_is_dropped_and_counted_while_admitted_flows_work(h: Harness) -> None:
    echo = h.echo()
    rid, _svcs, (lsock,) = h.services([local(echo.port)], max_flows=2)
    addr = lsock.getsockname()
    a, b, c = h.client(), h.client(), h.client()
    for cl in (a, b):
        cl.sendto(b"hi", addr)
        assert cl.recvfrom(100)[0] == b"hi"
    for _ in range(3):
        c.sendto(b"nope", addr)
    wait_for(
        lambda: metric("portunus_udp_flows_dropped_overflow_total", rid) == 3,
        what="3 overflow datagrams counted",
    )
    c.settimeout(0.3)
    with pytest.raises(TimeoutError):
        c.recvfrom(100)
    assert not any(d == b"nope" for _, d in echo.seen)
    for cl in (a, b):
        cl.sendto(b"still", addr)
        assert cl.recvfrom(100)[0] == b"still"
    assert metric("portunus_udp_flows_active", rid) == 2
    assert metric("portunus_rule_connections_total", rid) == 2


def test_max_flows_is_per_rule_across_the_ports_of_a_range(h: Harness) -> None:
    e0 = h.echo()
    e1 = None
    for _ in range(50):  # the target range needs two consecutive ports as well
        try:
            e1 = h.echo(e0.port + 1)
            break
        except OSError:
            e0 = h.echo()
    assert e1 is not None
    target = Target("127.0.0.1", e0.port, port_end=e0.port + 1)
    rid, _svcs, (l0, l1) = h.services([target], ports=2, max_flows=2)
    a, b, c = h.client(), h.client(), h.client()
    a.sendto(b"p0", l0.getsockname())
    b.sendto(b"p1", l1.getsockname())
    assert a.recvfrom(100)[0] == b"p0"
    assert b.recvfrom(100)[0] == b"p1"
    # Each listen port reached the target port at the same offset.
    assert [d for _, d in e0.seen] == [b"p0"]
    assert [d for _, d in e1.seen] == [b"p1"]
    c.sendto(b"p0-overflow", l0.getsockname())
    wait_for(
        lambda: metric("portunus_udp_flows_dropped_overflow_total", rid) == 1,
        what="third flow of the rule refused",
    )


def test_bytes_and_datagrams_counted(h: Harness) -> None:
    echo = h.echo()
    rid, _svcs, (lsock,) = h.services([local(echo.port)])
    addr = lsock.getsockname()
    c = h.client()
    sizes = [1, 17, 512, 1400, 9000, 60000]
    for n in sizes:
        c.sendto(b"x" * n, addr)
        assert len(c.recvfrom(65536)[0]) == n
    total = sum(sizes)
    wait_for(lambda: metric("portunus_rule_bytes_in_total", rid) == total, 3, "bytes in flushed")
    wait_for(lambda: metric("portunus_rule_bytes_out_total", rid) == total, 3, "bytes out flushed")
    assert metric("portunus_rule_datagrams_in_total", rid) == len(sizes)
    assert metric("portunus_rule_datagrams_out_total", rid) == len(sizes)


def test_refused_target_fails_over_to_the_next(h: Harness) -> None:
    echo = h.echo()
    dead = dead_port()
    rid, _svcs, (lsock,) = h.services([local(dead, 1), local(echo.port, 2)])
    c = h.client()
    c.sendto(b"first", lsock.getsockname())
    # The datagram refused by the primary (ICMP) is resent to the backup.
    assert c.recvfrom(100)[0] == b"first"
    assert (
        metric("portunus_detail_target_connect_failures_total", rid, target=f"127.0.0.1:{dead}")
        == 1
    )
    assert (
        metric("portunus_detail_target_connections_total", rid, target=f"127.0.0.1:{echo.port}")
        == 1
    )
    c.sendto(b"second", lsock.getsockname())
    assert c.recvfrom(100)[0] == b"second"
    assert metric("portunus_rule_connections_total", rid) == 1


def test_refused_single_target_ends_the_flow(h: Harness) -> None:
    dead = dead_port()
    rid, (svc,), (lsock,) = h.services([local(dead)])
    c = h.client()
    c.sendto(b"lost", lsock.getsockname())
    wait_for(
        lambda: metric("portunus_rule_connect_failures_total", rid) == 1, what="connect failure"
    )
    assert h.call(lambda: len(svc.flows)) == 0
    assert metric("portunus_udp_flows_active", rid) == 0


def test_dns_name_target_resolves_then_forwards_queued_datagrams(h: Harness) -> None:
    echo = h.echo()
    rid, _svcs, (lsock,) = h.services([local(echo.port, host="localhost")])
    c = h.client()
    c.sendto(b"one", lsock.getsockname())
    c.sendto(b"two", lsock.getsockname())
    assert sorted(c.recvfrom(100)[0] for _ in range(2)) == [b"one", b"two"]
    assert metric("portunus_udp_flows_active", rid) == 1


class CountingResolver:
    """Answers every name with 127.0.0.1 and records the names it was asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(self, host: str, prefer_ipv6: bool = False) -> list[str]:
        self.asked.append(host)
        return ["127.0.0.1"]


def test_backup_name_is_not_resolved_while_the_primary_answers(h: Harness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services(
        [local(echo.port, 1), local(echo.port, 2, host="backup.test")]
    )
    resolver = CountingResolver()
    svc.ctx._resolver = resolver
    c = h.client()
    c.sendto(b"hello", lsock.getsockname())
    assert c.recvfrom(100)[0] == b"hello"
    assert resolver.asked == []


def test_refused_primary_falls_through_to_a_backup_name_resolved_then(h: Harness) -> None:
    echo = h.echo()
    dead = dead_port()
    rid, (svc,), (lsock,) = h.services([local(dead, 1), local(echo.port, 2, host="backup.test")])
    resolver = CountingResolver()
    svc.ctx._resolver = resolver
    c = h.client()
    c.sendto(b"first", lsock.getsockname())
    # Refused by the primary, queued while the backup's name resolves, then resent.
    assert c.recvfrom(100)[0] == b"first"
    assert resolver.asked == ["backup.test"]
    c.sendto(b"second", lsock.getsockname())
    assert c.recvfrom(100)[0] == b"second"
    assert metric("portunus_rule_connections_total", rid) == 1


def test_close_closes_flows_but_not_the_listener(h: Harness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)])
    addr = lsock.getsockname()
    c = h.client()
    c.sendto(b"x", addr)
    assert c.recvfrom(100)[0] == b"x"
    flows = h.call(lambda: list(svc.flows.values()))
    h.call(svc.close)
    assert all(f.sock is None and f.closed for f in flows)
    assert metric("portunus_udp_flows_active", rid) == 0
    assert metric("portunus_rule_active_connections", rid) == 0
    assert lsock.fileno() >= 0
    # Nobody reads the listener any more: the datagram waits in its queue.
    c.sendto(b"queued", addr)
    lsock.settimeout(2)
    data, src = lsock.recvfrom(100)
    assert (data, src) == (b"queued", c.getsockname())


# ------------------------------------------------------------- flow budget

_BUDGET_PEER = textwrap.dedent("""
    import sys
    from portunus.shard.udp_budget import FlowBudget
    b = FlowBudget(int(sys.argv[2]), sys.argv[1])
    for line in sys.stdin:
        cmd, n = line.split()
        if cmd == "acquire":
            print(sum(b.try_acquire() for _ in range(int(n))), flush=True)
        elif cmd == "release":
            for _ in range(int(n)):
                b.release()
            print("ok", flush=True)
""")


class BudgetPeer:
    """Another process (a stand-in shard) holding the same budget file."""

    def __init__(self, path: Path, limit: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BUDGET_PEER, str(path), str(limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def test_budget_is_shared_between_processes_and_survives_a_dead_one(tmp_path: Path) -> None:
    path = tmp_path / "rule.flows"
    p1, p2 = BudgetPeer(path, 5), BudgetPeer(path, 5)
    try:
        assert p1.ask("acquire 3") == "3"
        assert p2.ask("acquire 5") == "2"
        assert p1.ask("release 1") == "ok"
        time.sleep(0.15)  # past p2's "full" memo
        assert p2.ask("acquire 5") == "1"
        # A shard that dies with flows open does not keep its share.
        p1.kill()
        time.sleep(0.15)
        assert p2.ask("acquire 5") == "2"
        me = FlowBudget(5, str(path))
        try:
            assert not me.try_acquire()
            assert me.total() == 5
        finally:
            me.close()
    finally:
        p1.kill()
        p2.kill()


def test_budget_release_reopens_admission_at_once(tmp_path: Path) -> None:
    b = FlowBudget(2, str(tmp_path / "r.flows"))
    try:
        assert b.try_acquire() and b.try_acquire()
        assert not b.try_acquire()
        b.release()
        assert b.try_acquire()
        assert b.total() == 2
    finally:
        b.close()


def test_dropped_datagrams_are_logged_at_most_every_drop_log_secs(monkeypatch: Any) -> None:
    """Both UDP handlers (Python and native) log drops through UdpPort.log_drops: one
    line with the count so far, then silence for DROP_LOG_SECS while the count goes on."""
    from types import SimpleNamespace

    from portunus.shard import udp as udp_mod

    lines: list[dict[str, Any]] = []
    monkeypatch.setattr(
        udp_mod, "log_event", lambda event, **kw: lines.append({"event": event, **kw})
    )
    now = [100.0]
    port = SimpleNamespace(
        ctx=SimpleNamespace(loop=SimpleNamespace(time=lambda: now[0])),
        rt=SimpleNamespace(rule=SimpleNamespace(id="7", listen_start=5000)),
        port_index=2,
        dropped=3,
        last_drop_log=-udp_mod.DROP_LOG_SECS,
    )
    udp_mod.UdpPort.log_drops(port)  # type: ignore[arg-type]
    assert [(e["event"], e["port"], e["count"]) for e in lines] == [
        ("udp.datagrams_dropped", 5002, 3)
    ]
    assert port.dropped == 0
    port.dropped = 4
    now[0] += udp_mod.DROP_LOG_SECS / 2
    udp_mod.UdpPort.log_drops(port)  # type: ignore[arg-type]
    assert len(lines) == 1 and port.dropped == 4  # throttled: counted, not logged
    now[0] += udp_mod.DROP_LOG_SECS
    udp_mod.UdpPort.log_drops(port)  # type: ignore[arg-type]
    assert lines[-1]["count"] == 4 and port.dropped == 0
