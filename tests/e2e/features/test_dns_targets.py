"""DNS-name targets in a real shard: /etc/hosts names, a scripted DNS server,
coalescing, the TTL floor, stale answers while the resolver fails, fast failure of
unknown names, IPv4-first vs ``prefer_ipv6`` — standalone and through the server.

The scripted server is reached by running the Portunus process in a private mount
namespace with its own /etc/resolv.conf (see fakedns.py): the product has no
setting to point its resolver elsewhere.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.features.fakedns import (
    TYPE_A,
    TYPE_AAAA,
    FakeDns,
    in_resolv_namespace,
    namespace_supported,
)
from tests.e2e.features.helpers import (
    ServerFactory,
    ServerProc,
    StreamListener,
    UdpPortEcho,
    port_reporter,
    reached_port,
    udp_exchange,
)
from tests.e2e.support import (
    LOOPBACK,
    Origin,
    PortAllocator,
    StandaloneFactory,
    StandaloneProc,
    echo,
    echo_roundtrip,
    wait_for,
)

# ---------------------------------------------------------- names from /etc/hosts


def test_standalone_localhost_target(
    standalone: StandaloneFactory, ports: PortAllocator, origin: Callable[..., Origin]
) -> None:
    o = origin(echo)
    listen = ports.port()
    standalone([{"name": "lh", "listen_port": listen, "target": f"localhost:{o.port}"}])
    for _ in range(3):
        assert echo_roundtrip(listen, b"via localhost\n")
    assert len(o.records) == 3


def test_server_localhost_target(
    server: ServerFactory, ports: PortAllocator, origin: Callable[..., Origin]
) -> None:
    srv = server()
    o = origin(echo)
    listen = ports.port()
    rule = srv.cli_json("push-rule", "local", str(listen), f"localhost:{o.port}")
    assert rule["state"] == "active" and rule["targets"][0]["host"] == "localhost"
    assert echo_roundtrip(listen, b"via localhost\n")


# ---------------------------------------------------------- scripted DNS server


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    why = namespace_supported()
    if why:
        pytest.skip(why)
    server = FakeDns()
    yield server
    server.close()


class DualStack:
    """The same port on 127.0.0.1 and ::1; the reply says which family answered."""

    def __init__(self, port: int) -> None:
        def v4(conn: socket.socket) -> None:
            conn.sendall(b"v4\n")

        def v6(conn: socket.socket) -> None:
            conn.sendall(b"v6\n")

        self.port = port
        self.listeners = [StreamListener(LOOPBACK, port, v4), StreamListener("::1", port, v6)]

    def close(self) -> None:
        for x in self.listeners:
            x.close()


def family_reached(port: int) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        return s.recv(16)


class Env:
    """One namespaced standalone with a rule per scenario; ``listen[name]`` is its port."""

    def __init__(
        self, proc: StandaloneProc, listen: dict[str, int], reporter: Origin, dual: DualStack
    ) -> None:
        self.proc = proc
        self.listen = listen
        self.reporter = reporter
        self.dual = dual


@pytest.fixture(scope="module")
def env(
    dns: FakeDns,
    tmp_path_factory: pytest.TempPathFactory,
    ports: PortAllocator,
    origin_module: Callable[..., Origin],
) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("dns")
    reporter = origin_module(port_reporter)
    dual = DualStack(ports.port())
    udp_port = ports.port()
    udp_origin = UdpPortEcho([udp_port])
    for name in (
        "coalesce.portunus.test",
        "stale.portunus.test",
        "expire.portunus.test",
        "udp.portunus.test",
    ):
        dns.records[name] = {"A": [LOOPBACK], "ttl": 1}
    dns.records["dual.portunus.test"] = {"A": [LOOPBACK], "AAAA": ["::1"], "ttl": 60}
    dns.mode["deadbackup.portunus.test"] = "drop"  # its lookups time out (2 s)
    names = ["coalesce", "stale", "expire", "nx", "v4first", "v6first", "udp", "backup"]
    listen = dict(zip(names, ports.ports(len(names)), strict=True))
    rules = [
        {"name": n, "listen_port": listen[n], "target": f"{n}.portunus.test:{reporter.port}"}
        for n in ("coalesce", "stale", "expire", "nx")
    ] + [
        {
            "name": "v4first",
            "listen_port": listen["v4first"],
            "target": f"dual.portunus.test:{dual.port}",
        },
        {
            "name": "v6first",
            "listen_port": listen["v6first"],
            "prefer_ipv6": True,
            "target": f"dual.portunus.test:{dual.port}",
        },
        {
            "name": "udp",
            "protocol": "udp",
            "listen_port": listen["udp"],
            "target": f"udp.portunus.test:{udp_port}",
        },
        {
            "name": "backup",
            "listen_port": listen["backup"],
            "targets": [
                {"host": LOOPBACK, "port": reporter.port, "priority": 1},
                {"host": "deadbackup.portunus.test", "port": reporter.port, "priority": 2},
            ],
        },
    ]
    proc = StandaloneProc(
        workdir=work, metrics_port=ports.port(), rules=rules, shards=1, name="dns-standalone"
    )
    proc.argv = in_resolv_namespace(proc.argv, dns.write_resolv_conf(work / "resolv.conf"))
    try:
        proc.start()
        proc.wait_ready()
        yield Env(proc, listen, reporter, dual)
    finally:
        proc.kill_tree()
        dual.close()
        udp_origin.close()


def test_the_namespace_does_not_leak_into_the_machine(dns: FakeDns) -> None:
    assert dns.address not in Path("/etc/resolv.conf").read_text()


def test_concurrent_first_connections_share_one_lookup(env: Env, dns: FakeDns) -> None:
    name = "coalesce.portunus.test"
    assert dns.count(name) == 0
    dns.delay[name] = 0.5  # every client arrives while the first lookup is in flight
    port = env.listen["coalesce"]
    start = threading.Barrier(20)
    results: list[int | BaseException] = []

    def client() -> None:
        start.wait()
        try:
            results.append(reached_port(port, b"x" * 100))
        except (OSError, AssertionError, ValueError) as exc:
            results.append(exc)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    dns.delay.pop(name)
    assert results == [env.reporter.port] * 20
    assert (dns.count(name, TYPE_A), dns.count(name, TYPE_AAAA)) == (1, 1)


def test_resolver_failure_serves_the_stale_answer(env: Env, dns: FakeDns) -> None:
    """TTL 1 is clamped up to 5 s: no new query for 4 s.  Then the server fails
    (SERVFAIL) and connections made after the answer expired still reach the
    origin through the stale answer, while the failed refresh is logged."""
    name = "stale.portunus.test"
    port = env.listen["stale"]
    mark = env.proc.log_mark()
    assert reached_port(port) == env.reporter.port
    t0 = time.monotonic()
    assert dns.count(name) == 1
    dns.mode[name] = "servfail"
    try:
        while time.monotonic() - t0 < 4.0:  # inside the 5 s floor: served from the cache
            assert reached_port(port) == env.reporter.port
            # Refresh-ahead may start at 90 % of the 5 s floor (4.5 s); a connection
            # that completed before 4.0 s cannot have triggered it.
            if time.monotonic() - t0 < 4.0:
                assert dns.count(name) == 1, "re-queried before the 5 s TTL floor"
            time.sleep(0.25)
        while time.monotonic() - t0 < 6.5:  # expired at 5 s; the resolver fails
            assert reached_port(port) == env.reporter.port
            time.sleep(0.25)
        assert dns.count(name) >= 2, "the expired answer was never refreshed"
        env.proc.wait_log("dns.refresh_failed", since=mark, host=name)
        assert not env.proc.events("dns.resolve_failed", since=mark, host=name)
    finally:
        dns.mode.pop(name)


def connection_forwarded(port: int) -> bool:
    """True if the connection reached an origin, False if Portunus closed it."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        try:
            return s.recv(64) != b""
        except ConnectionResetError:
            return False


@pytest.mark.slow
def test_stale_answer_ends_30s_after_expiry(env: Env, dns: FakeDns) -> None:
    """The stale answer is served for 30 s past its expiry, not for ever."""
    name = "expire.portunus.test"
    port = env.listen["expire"]
    assert reached_port(port) == env.reporter.port
    t0 = time.monotonic()
    dns.mode[name] = "servfail"
    mark = env.proc.log_mark()
    try:
        while time.monotonic() - t0 < 33.0:  # expiry at 5 s + 30 s of stale answers
            assert connection_forwarded(port), f"refused at {time.monotonic() - t0:.1f}s"
            time.sleep(1.0)
        time.sleep(max(0.0, 37.0 - (time.monotonic() - t0)))
        assert not connection_forwarded(port)
        env.proc.wait_log("dns.resolve_failed", since=mark, host=name)
    finally:
        dns.mode.pop(name)


def test_unknown_name_fails_the_connection_fast_and_is_counted(env: Env, dns: FakeDns) -> None:
    port = env.listen["nx"]
    mark = env.proc.log_mark()
    reached_before = len(env.reporter.records)
    t0 = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.sendall(b"hello")
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    assert time.monotonic() - t0 < 1.0
    rec = env.proc.wait_log("dns.resolve_failed", since=mark, host="nx.portunus.test")
    assert rec["rule"] == "nx"
    wait_for(
        lambda: env.proc.scrape().value("portunus_dns_failures_total", rule="nx") >= 1,
        5,
        what="portunus_dns_failures_total{rule=nx}",
    )
    assert env.proc.scrape().value("portunus_rule_connect_failures_total", rule="nx") >= 1
    assert len(env.reporter.records) == reached_before  # nothing reached an origin


def test_ipv4_first_unless_prefer_ipv6(env: Env) -> None:
    assert family_reached(env.listen["v4first"]) == b"v4\n"
    assert family_reached(env.listen["v6first"]) == b"v6\n"


def test_udp_rule_with_a_dns_target(env: Env) -> None:
    port = env.listen["udp"]
    assert udp_exchange(port, b"dns udp").endswith(b":dns udp")


def test_healthy_primary_does_not_wait_for_the_backups_dns(env: Env, dns: FakeDns) -> None:
    port = env.listen["backup"]
    for _ in range(2):
        t0 = time.monotonic()
        assert reached_port(port, timeout=10) == env.reporter.port
        assert time.monotonic() - t0 < 0.5, f"first byte after {time.monotonic() - t0:.2f}s"


# ------------------------------------------------------------------- server


def test_server_prefer_ipv6_flag_and_body_field(
    server: ServerFactory, dns: FakeDns, ports: PortAllocator, tmp_path: Path
) -> None:
    dual = DualStack(ports.port())
    dns.records["srvdual.portunus.test"] = {"A": [LOOPBACK], "AAAA": ["::1"], "ttl": 60}
    resolv = dns.write_resolv_conf(tmp_path / "resolv.conf")
    try:
        srv: ServerProc = server(wrap=lambda argv: in_resolv_namespace(argv, resolv))
        a, b, c = ports.ports(3)
        target = f"srvdual.portunus.test:{dual.port}"
        plain = srv.cli_json("push-rule", "local", str(a), target)
        v6 = srv.cli_json("push-rule", "local", str(b), target, "--prefer-ipv6")
        assert (plain["prefer_ipv6"], v6["prefer_ipv6"]) == (False, True)
        status, body = srv.http(
            "POST",
            "/v1/rules",
            {
                "client": "local",
                "listen_port": c,
                "prefer_ipv6": True,
                "targets": [{"host": "srvdual.portunus.test", "port": dual.port}],
            },
        )
        assert status == 201 and body["prefer_ipv6"] is True, body
        assert family_reached(a) == b"v4\n"
        assert family_reached(b) == b"v6\n"
        assert family_reached(c) == b"v6\n"
    finally:
        dual.close()
