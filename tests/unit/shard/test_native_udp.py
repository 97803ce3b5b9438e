"""A plain UDP port served by the native relay (native_udp.py + relay_udp.c).

The behaviour tests of the Python path (test_udp.py) run here again against the
native handler (same harness, same metrics), plus what is particular to the
native side: the flow table read from C, idle reaping by the relay's tick, the
cap released when the relay reports a close, bursts bigger than one recvmmsg
batch, a spurious wake-up, and ICMP errors before and after a target answered.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portunus.rules import Target, build_rule
from portunus.shard.native_udp import NativeUdpHandler, eligible
from portunus.shard.runtime import RuleRuntime, ShardContext

from . import test_udp as py
from .test_udp import dead_port, local, metric, wait_for

try:
    from portunus.shard._relay import Relay
except ImportError:
    pytest.skip(
        "the native relay is not built (no C compiler at install time)", allow_module_level=True
    )


@pytest.fixture(autouse=True, params=["thread", "loop"])
def relay_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: the relay's own thread (the default) and driven from the loop."""
    monkeypatch.setenv("PORTUNUS_NATIVE_THREAD", "1" if request.param == "thread" else "0")
    return str(request.param)


class NativeHarness(py.Harness):
    """test_udp's harness, with NativeUdpHandler in place of UdpService."""

    def services(  # type: ignore[override]
        self, targets: list[Target], *, ports: int = 1, idle: float = 60.0, max_flows: int = 1024
    ) -> tuple[str, list[NativeUdpHandler], list[socket.socket]]:
        listeners = self._consecutive_listeners(ports)
        lo = listeners[0].getsockname()[1]
        rid = f"nu{next(py._ids)}-{time.monotonic_ns()}"
        rule = build_rule(id=rid, protocol="udp", listen=(lo, lo + ports - 1), targets=targets)
        settings = {
            "udp_flow_idle_secs": idle,
            "udp_max_flows": max_flows,
            "shards": 1,
            "runtime_dir": str(self.tmp),
            "client": "local",
        }
        ctx = ShardContext(self.loop, settings)
        ctx.native_type = Relay  # on even under PORTUNUS_NATIVE=0: this tests the native side
        rt = RuleRuntime(ctx, rule)
        assert eligible(ctx, rt)
        svcs = [NativeUdpHandler(ctx, rt, s, i) for i, s in enumerate(listeners)]
        for svc in svcs:
            self.call(svc.start)
            self.cleanups.append(lambda svc=svc: self.call(svc.close))
        return rid, svcs, listeners


@pytest.fixture
def h(tmp_path: Path) -> Iterator[NativeHarness]:
    harness = NativeHarness(tmp_path)
    yield harness
    harness.close()


# The Python path's behaviour, unchanged, on the native path.
test_each_client_gets_only_its_own_replies = py.test_each_client_gets_only_its_own_replies
test_overflow_is_dropped_and_counted_while_admitted_flows_work = (
    py.test_overflow_is_dropped_and_counted_while_admitted_flows_work
)
test_max_flows_is_per_rule_across_the_ports_of_a_range = (
    py.test_max_flows_is_per_rule_across_the_ports_of_a_range
)
test_bytes_and_datagrams_counted = py.test_bytes_and_datagrams_counted


def test_refused_target_fails_over_to_the_next(h: NativeHarness) -> None:
    echo = h.echo()
    dead = dead_port()
    rid, _svcs, (lsock,) = h.services([local(dead, 1), local(echo.port, 2)])
    c = h.client()
    c.sendto(b"first", lsock.getsockname())
    # The datagram refused by the primary (ICMP) is resent to the backup.
    assert c.recvfrom(100)[0] == b"first"
    # Reported by the poll() that forwarded the reply: a moment after it left.
    dead_t, live_t = f"127.0.0.1:{dead}", f"127.0.0.1:{echo.port}"
    wait_for(
        lambda: metric("portunus_detail_target_connections_total", rid, target=live_t) == 1,
        what="backup counted",
    )
    assert metric("portunus_detail_target_connect_failures_total", rid, target=dead_t) == 1
    c.sendto(b"second", lsock.getsockname())
    assert c.recvfrom(100)[0] == b"second"
    assert metric("portunus_rule_connections_total", rid) == 1


def flows(h: NativeHarness, svc: NativeUdpHandler) -> list[tuple[str, int]]:
    return list(h.call(svc.flow_addrs))


def test_only_rules_without_limits_owner_or_names_are_eligible(h: NativeHarness) -> None:
    ctx = ShardContext(h.loop, {"runtime_dir": str(h.tmp)})
    ctx.native_type = Relay

    def rt(**kw: Any) -> RuleRuntime:
        base: dict[str, Any] = {
            "id": f"e{next(py._ids)}",
            "protocol": "udp",
            "listen": (40000, 40000),
        }
        base.setdefault("targets", [local(9)])
        base.update(kw)
        return RuleRuntime(ctx, build_rule(**base))

    assert eligible(ctx, rt())
    assert eligible(ctx, rt(idle_timeout_secs=5))  # the relay keeps the idle clock
    assert not eligible(ctx, rt(targets=[local(9, host="localhost")]))
    assert not eligible(ctx, rt(owner="alice"))  # owner caps gate and pace in Python
    limited = rt(rate_limit={"bandwidth_in_bps": 1 << 20})
    assert not eligible(ctx, limited)
    limited.release_limits()
    ctx.native_type = None
    assert not eligible(ctx, rt())


def test_flow_table_has_one_entry_per_client(h: NativeHarness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)])
    addr = lsock.getsockname()
    a, b = h.client(), h.client()
    for _ in range(3):
        for c in (a, b):
            c.sendto(b"x", addr)
            assert c.recvfrom(10)[0] == b"x"
    assert sorted(flows(h, svc)) == sorted([a.getsockname(), b.getsockname()])
    assert len(echo.sources()) == 2  # one upstream socket each
    assert metric("portunus_rule_connections_total", rid) == 2


def test_idle_flow_is_reaped_but_a_busy_one_is_not(h: NativeHarness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)], idle=0.3)
    addr = lsock.getsockname()
    busy, idle = h.client(), h.client()
    idle.sendto(b"once", addr)
    assert idle.recvfrom(100)[0] == b"once"
    end = time.monotonic() + 1.2
    while time.monotonic() < end:
        busy.sendto(b"tick", addr)
        assert busy.recvfrom(100)[0] == b"tick"
        time.sleep(0.05)
    assert flows(h, svc) == [busy.getsockname()]
    assert metric("portunus_udp_flows_active", rid) == 1
    wait_for(lambda: metric("portunus_udp_flows_active", rid) == 0, what="busy flow reaped")
    assert flows(h, svc) == []
    assert metric("portunus_rule_active_connections", rid) == 0
    idle.sendto(b"again", addr)
    assert idle.recvfrom(100)[0] == b"again"
    assert metric("portunus_rule_connections_total", rid) == 3


def test_a_reaped_flow_gives_its_cap_slot_back(h: NativeHarness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)], idle=0.3, max_flows=1)
    addr = lsock.getsockname()
    a, b = h.client(), h.client()
    a.sendto(b"a", addr)
    assert a.recvfrom(10)[0] == b"a"
    b.sendto(b"b", addr)
    wait_for(lambda: metric("portunus_udp_flows_dropped_overflow_total", rid) == 1, what="refusal")
    assert h.call(lambda: svc.budget.local) == 1
    wait_for(lambda: h.call(lambda: svc.budget.local) == 0, what="slot released by the reap")
    b.sendto(b"b2", addr)
    assert b.recvfrom(10)[0] == b"b2"


def test_a_burst_bigger_than_one_batch_is_forwarded_whole(h: NativeHarness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)])
    c = h.client()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    n = 300  # several recvmmsg batches of 64, each ended by EAGAIN
    for i in range(n):
        c.sendto(b"%d" % i, lsock.getsockname())
        if i % 50 == 49:
            time.sleep(0.01)  # the echo thread keeps up: nothing lost before the relay
    got = sorted(int(c.recvfrom(100)[0]) for _ in range(n))
    assert got == list(range(n))
    wait_for(lambda: metric("portunus_rule_datagrams_out_total", rid) == n, 3, "counts flushed")
    assert metric("portunus_rule_datagrams_in_total", rid) == n


def test_a_spurious_wakeup_finds_nothing_and_changes_nothing(h: NativeHarness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)])
    c = h.client()
    c.sendto(b"x", lsock.getsockname())
    assert c.recvfrom(10)[0] == b"x"
    for _ in range(5):  # every socket would say EAGAIN
        h.call(svc.ctx.native.dispatch)
    c.sendto(b"y", lsock.getsockname())
    assert c.recvfrom(10)[0] == b"y"
    assert flows(h, svc) == [c.getsockname()]


def test_refused_single_target_ends_the_flow(h: NativeHarness) -> None:
    dead = dead_port()
    rid, (svc,), (lsock,) = h.services([local(dead)])
    c = h.client()
    c.sendto(b"lost", lsock.getsockname())
    wait_for(
        lambda: metric("portunus_rule_connect_failures_total", rid) == 1, what="connect failure"
    )
    wait_for(lambda: metric("portunus_udp_flows_active", rid) == 0, what="flow closed")
    assert flows(h, svc) == []
    assert (
        metric("portunus_detail_target_connect_failures_total", rid, target=f"127.0.0.1:{dead}")
        == 1
    )
    assert h.call(lambda: svc.budget.local) == 0


def test_target_gone_after_answering_moves_the_flow_to_the_backup(h: NativeHarness) -> None:
    primary, backup = h.echo(), h.echo()
    rid, (svc,), (lsock,) = h.services([local(primary.port, 1), local(backup.port, 2)])
    c = h.client()
    addr = lsock.getsockname()
    c.sendto(b"one", addr)
    assert c.recvfrom(10)[0] == b"one"
    primary.stop()  # its port now answers with ICMP port unreachable
    c.settimeout(0.3)
    got = None
    for _ in range(20):
        c.sendto(b"again", addr)
        try:
            got = c.recvfrom(10)[0]
            break
        except TimeoutError:
            continue
    assert got == b"again"
    assert b"again" in [d for _, d in backup.seen]
    wait_for(
        lambda: (
            metric(
                "portunus_detail_target_connect_failures_total",
                rid,
                target=f"127.0.0.1:{primary.port}",
            )
            == 1
        ),
        what="primary failure counted",
    )
    assert metric("portunus_rule_connections_total", rid) == 1  # the same flow throughout
    assert flows(h, svc) == [c.getsockname()]


def test_close_closes_flows_but_not_the_listener(h: NativeHarness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)])
    addr = lsock.getsockname()
    c = h.client()
    c.sendto(b"x", addr)
    assert c.recvfrom(100)[0] == b"x"
    h.call(svc.close)
    assert metric("portunus_udp_flows_active", rid) == 0
    assert metric("portunus_rule_active_connections", rid) == 0
    assert svc.budget is None and svc.handle is None
    assert svc.flows not in svc.rt.conns
    assert lsock.fileno() >= 0
    c.sendto(b"queued", addr)
    lsock.settimeout(2)
    data, src = lsock.recvfrom(100)
    assert (data, src) == (b"queued", c.getsockname())


def test_a_draining_rule_admits_no_new_flow(h: NativeHarness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)])
    a, b = h.client(), h.client()
    a.sendto(b"a", lsock.getsockname())
    assert a.recvfrom(10)[0] == b"a"
    svc.rt.draining = True
    b.sendto(b"b", lsock.getsockname())
    b.settimeout(0.3)
    with pytest.raises(TimeoutError):
        b.recvfrom(10)
    a.sendto(b"a2", lsock.getsockname())  # an open flow carries on
    assert a.recvfrom(10)[0] == b"a2"
    assert flows(h, svc) == [a.getsockname()]


def test_a_reload_shortens_the_idle_time_of_open_flows(h: NativeHarness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)], idle=60.0)
    c = h.client()
    c.sendto(b"x", lsock.getsockname())
    assert c.recvfrom(10)[0] == b"x"
    svc.ctx.settings["udp_flow_idle_secs"] = 0.2
    h.call(svc.retune)
    wait_for(lambda: flows(h, svc) == [], 3, "flow reaped under the new idle time")
    wait_for(lambda: metric("portunus_udp_flows_active", rid) == 0, what="gauge follows")


def test_the_shard_picks_the_path_per_rule_and_moves_a_port_on_update(h: NativeHarness) -> None:
    """Shard.handler_for: a plain UDP rule is served natively; the same port with a rate
    limit goes to udp.py, and back again; with the extension off everything is udp.py."""
    from portunus.shard.main import Shard
    from portunus.shard.udp import UdpService

    a, b = socket.socketpair()
    h.cleanups += [a.close, b.close]
    shard = Shard(0, h.loop, a)
    shard.ctx.settings.update({"runtime_dir": str(h.tmp), "shards": 1})
    shard.ctx.native_type = Relay
    port = 40000 + next(py._ids) % 20000
    plain = build_rule(
        id=f"sw{next(py._ids)}", protocol="udp", listen=(port, port), targets=[local(9)]
    )
    limited = build_rule(
        id=plain.id,
        protocol="udp",
        listen=(port, port),
        targets=[local(9)],
        rate_limit={"bandwidth_in_bps": 1 << 20},
    )
    kinds = []
    for rule in (plain, limited, plain):
        h.call(shard.upsert, rule)
        sig, factory = h.call(shard.handler_for, f"udp/{port}")
        lsock = h.listener()
        handler = h.call(factory, lsock)
        kinds.append((sig[0], type(handler)))
    assert kinds == [
        ("nudp", NativeUdpHandler),
        ("udp", UdpService),
        ("nudp", NativeUdpHandler),
    ]
    shard.ctx.native_type = None  # PORTUNUS_NATIVE=0 or no extension
    h.call(shard.upsert, limited)
    h.call(shard.upsert, plain)
    assert h.call(shard.handler_for, f"udp/{port}")[0][0] == "udp"
    for rt in list(shard.rules.values()):
        h.call(rt.release_limits)


def test_close_all_closes_the_flows_and_the_port_keeps_serving(h: NativeHarness) -> None:
    echo = h.echo()
    rid, (svc,), (lsock,) = h.services([local(echo.port)])
    a, b = h.client(), h.client()
    for c in (a, b):
        c.sendto(b"x", lsock.getsockname())
        assert c.recvfrom(10)[0] == b"x"
    assert svc.flows in svc.rt.conns
    h.call(svc.rt.close_all)  # the drain timeout / shard stop path
    assert flows(h, svc) == []
    assert svc.flows not in svc.rt.conns
    assert metric("portunus_udp_flows_active", rid) == 0
    assert h.call(lambda: svc.budget.local) == 0
    a.sendto(b"again", lsock.getsockname())  # not draining: a new flow opens
    assert a.recvfrom(10)[0] == b"again"
    assert metric("portunus_rule_connections_total", rid) == 3
