"""UDP rules through ``portunus-standalone``: flows, reaping, overflow, shard stickiness.

A threaded UDP echo origin records which upstream source (Portunus's per-flow
socket) carried each datagram, so the tests can tell flows apart from the origin's
side as well as from the clients'.  Every payload names its client, so a reply
delivered to the wrong sender is caught.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import psutil
import pytest

from tests.e2e.support import LOOPBACK, StandaloneProc, wait_for

RULE = "udp-echo"


class UdpEcho:
    """Echo origin on 127.0.0.1; ``seen`` lists (upstream source, payload)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.seen: list[tuple[tuple[str, int], bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.seen.append((addr, data))
            with contextlib.suppress(OSError):
                self.sock.sendto(data, addr)

    def sources_by_client(self) -> dict[str, set[tuple[str, int]]]:
        """Client name (payload prefix before '/') -> upstream sources seen for it."""
        out: dict[str, set[tuple[str, int]]] = {}
        for src, data in list(self.seen):
            out.setdefault(data.split(b"/")[0].decode(), set()).add(src)
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    e = UdpEcho()
    yield e
    e.close()


@pytest.fixture
def clients() -> Iterator[Callable[[int], list[socket.socket]]]:
    made: list[socket.socket] = []

    def make(n: int) -> list[socket.socket]:
        out = []
        for _ in range(n):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            made.append(c)
            c.bind((LOOPBACK, 0))
            c.settimeout(3.0)
            out.append(c)
        return out

    yield make
    for c in made:
        c.close()


def start_udp(
    standalone,
    ports,
    echo: UdpEcho,
    *,
    shards: int = 1,  # type: ignore[no-untyped-def]
    **settings: object,
) -> tuple[StandaloneProc, tuple[str, int]]:
    port = ports.port()
    proc = standalone(
        [{"name": RULE, "protocol": "udp", "listen_port": port, "target": echo.address}],
        shards=shards,
        settings=settings,
    )
    # The shards serve the rule once its series exist; datagrams sent earlier would
    # wait in the (already bound) sockets anyway.
    wait_for(
        lambda: proc.scrape().has("portunus_rule_connections_total", rule=RULE),
        10,
        what="rule series in /metrics",
    )
    return proc, (LOOPBACK, port)


def value(proc: StandaloneProc, name: str) -> float:
    return proc.scrape().value(name, rule=RULE)


def exchange(cs: list[socket.socket], addr: tuple[str, int], rounds: int, tag: str = "") -> int:
    """Every client sends ``rounds`` datagrams (interleaved), then reads its echoes;
    asserts each got exactly its own.  Returns the bytes sent in all."""
    sent = 0
    expected: list[list[bytes]] = [[] for _ in cs]
    for r in range(rounds):
        for i, c in enumerate(cs):
            payload = f"c{i}/{tag}{r}/".encode() + b"x" * (i * 7 % 300)
            c.sendto(payload, addr)
            expected[i].append(payload)
            sent += len(payload)
    for i, c in enumerate(cs):
        got = []
        for _ in range(rounds):
            data, src = c.recvfrom(65536)
            assert src == addr, f"reply for client {i} came from {src}"
            got.append(data)
        assert sorted(got) == sorted(expected[i]), f"client {i} got {got[:3]}..."
    return sent


# ------------------------------------------------------------------------ tests


def test_fifty_concurrent_flows_each_get_their_own_echoes(
    standalone, ports, udp_echo, clients
) -> None:  # type: ignore[no-untyped-def]
    proc, addr = start_udp(standalone, ports, udp_echo)
    cs = clients(50)
    sent = exchange(cs, addr, rounds=4)
    by_client = udp_echo.sources_by_client()
    assert len(by_client) == 50
    assert all(len(srcs) == 1 for srcs in by_client.values()), "a client used two upstream sockets"
    assert len(set().union(*by_client.values())) == 50, "two clients shared an upstream socket"
    wait_for(
        lambda: value(proc, "portunus_rule_bytes_in_total") == sent, 5, what="bytes in == sent"
    )
    wait_for(
        lambda: value(proc, "portunus_rule_bytes_out_total") == sent, 5, what="bytes out == sent"
    )
    m = proc.scrape()
    assert m.value("portunus_rule_datagrams_in_total", rule=RULE) == 200
    assert m.value("portunus_rule_datagrams_out_total", rule=RULE) == 200
    assert m.value("portunus_rule_connections_total", rule=RULE) == 50
    assert m.value("portunus_udp_flows_active", rule=RULE) == 50
    assert m.value("portunus_rule_active_connections", rule=RULE) == 50


def test_idle_flows_are_reaped(standalone, ports, udp_echo, clients) -> None:  # type: ignore[no-untyped-def]
    proc, addr = start_udp(standalone, ports, udp_echo, udp_flow_idle_secs=1)
    cs = clients(5)
    exchange(cs, addr, rounds=1)
    assert value(proc, "portunus_udp_flows_active") == 5
    wait_for(lambda: value(proc, "portunus_udp_flows_active") == 0, 6, what="flows reaped")
    assert value(proc, "portunus_rule_active_connections") == 0
    # A reaped client that speaks again gets a fresh flow (and a fresh upstream socket).
    before = udp_echo.sources_by_client()["c0"]
    exchange(cs[:1], addr, rounds=1, tag="again")
    assert value(proc, "portunus_rule_connections_total") == 6
    assert len(udp_echo.sources_by_client()["c0"] - before) == 1


def test_overflow_dropped_and_counted_across_shards(standalone, ports, udp_echo, clients) -> None:  # type: ignore[no-untyped-def]
    # Two shards share one budget of 5: per-shard budgets would admit more.
    proc, addr = start_udp(standalone, ports, udp_echo, shards=2, udp_max_flows=5)
    first, extra = clients(5), clients(15)
    exchange(first, addr, rounds=1)
    for c in extra:
        c.sendto(b"over/1", addr)
        c.sendto(b"over/2", addr)
    wait_for(
        lambda: value(proc, "portunus_udp_flows_dropped_overflow_total") == 30,
        5,
        what=lambda: (
            f"30 overflow drops (have {value(proc, 'portunus_udp_flows_dropped_overflow_total')})"
        ),
    )
    for c in extra:
        c.settimeout(0.05)
        with pytest.raises(TimeoutError):
            c.recvfrom(100)
    assert not [d for _, d in udp_echo.seen if d.startswith(b"over")]
    exchange(first, addr, rounds=3, tag="later")  # the admitted flows are unaffected
    m = proc.scrape()
    assert m.value("portunus_udp_flows_active", rule=RULE) == 5
    assert m.value("portunus_rule_connections_total", rule=RULE) == 5
    assert proc.alive()


def _udp_ports_of(p: psutil.Process) -> set[int]:
    return {c.laddr.port for c in p.net_connections(kind="udp4") if c.raddr}


def test_two_shards_keep_each_flow_on_one_shard(standalone, ports, udp_echo, clients) -> None:  # type: ignore[no-untyped-def]
    proc, addr = start_udp(standalone, ports, udp_echo, shards=2)
    cs = clients(64)
    exchange(cs, addr, rounds=5)
    by_client = udp_echo.sources_by_client()
    assert len(by_client) == 64
    for name, srcs in by_client.items():
        assert len(srcs) == 1, f"{name}'s datagrams left through {len(srcs)} upstream sockets"
    # Which shard owns each upstream socket: every flow lives in exactly one, and
    # the kernel spread the clients over both.
    upstream = {next(iter(s))[1] for s in by_client.values()}
    owned = {i: _udp_ports_of(p) & upstream for i, p in proc.shards().items()}
    assert set(owned) == {0, 1}
    assert owned[0].isdisjoint(owned[1])
    assert owned[0] | owned[1] == upstream
    assert owned[0] and owned[1], f"all 64 flows landed on one shard: {owned}"
    assert value(proc, "portunus_udp_flows_active") == 64


def test_reload_retargets_flows_and_removal_closes_them(
    standalone, ports, udp_echo, clients
) -> None:  # type: ignore[no-untyped-def]
    proc, addr = start_udp(standalone, ports, udp_echo, shards=2)
    cs = clients(8)
    exchange(cs, addr, rounds=1)
    assert value(proc, "portunus_udp_flows_active") == 8
    other = UdpEcho()
    try:
        rule = dict(proc.rules[0], target=other.address)
        proc.write_config(rules=[rule])
        proc.reload()
        # The changed rule closed the old flows; the next datagrams open new ones.
        wait_for(lambda: value(proc, "portunus_udp_flows_active") == 0, 5, what="old flows closed")
        exchange(cs, addr, rounds=2, tag="moved")
        assert len(other.sources_by_client()) == 8
        assert not [d for _, d in udp_echo.seen if b"moved" in d]
        assert value(proc, "portunus_udp_flows_active") == 8
        proc.write_config(rules=[])
        proc.reload()
        wait_for(
            lambda: value(proc, "portunus_udp_flows_active") == 0, 5, what="flows closed on removal"
        )
        assert value(proc, "portunus_rule_active_connections") == 0
        assert proc.alive()
    finally:
        other.close()


def test_rule_changing_path_keeps_forwarding(standalone, ports, udp_echo, clients) -> None:  # type: ignore[no-untyped-def]
    """A plain UDP rule (native relay where built) gains a rate limit (Python path) and
    loses it again: each change closes the flows, the next datagrams open new ones on
    the new path, and the counters carry on across all three."""
    proc, addr = start_udp(standalone, ports, udp_echo)
    cs = clients(4)
    sent = exchange(cs, addr, rounds=2, tag="plain")
    plain = dict(proc.rules[0])
    capped = {**plain, "rate_limit": {"bandwidth_in_bps": 100_000_000}}
    for step, rule in (("capped", capped), ("again", plain)):
        proc.write_config(rules=[rule])
        proc.reload("config.reloaded")
        wait_for(lambda: value(proc, "portunus_udp_flows_active") == 0, 5, what="flows closed")
        sent += exchange(cs, addr, rounds=2, tag=step)
        assert value(proc, "portunus_udp_flows_active") == 4
    wait_for(lambda: value(proc, "portunus_rule_bytes_in_total") == sent, 5, what="bytes in")
    wait_for(lambda: value(proc, "portunus_rule_bytes_out_total") == sent, 5, what="bytes out")
    m = proc.scrape()
    assert m.value("portunus_rule_datagrams_in_total", rule=RULE) == 24
    assert m.value("portunus_rule_connections_total", rule=RULE) == 12
    assert proc.alive()
