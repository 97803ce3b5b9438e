"""Port-range rules: same-offset forwarding, all-or-none binding, per-port stats,
range validation — TCP and UDP, in standalone TOML and through the server.

Origins report the port they were reached on, so a reply names the target port
the shard chose for each listen port.  "Nothing stays bound" is checked the hard
way: after the foreign socket is gone, a plain bind (no SO_REUSEPORT) of every
port of the range must succeed — a leftover reuseport listener would refuse it.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.features.helpers import (
    ServerFactory,
    ServerProc,
    UdpPortEcho,
    bindable,
    port_reporter,
    reached_port,
    udp_exchange,
)
from tests.e2e.support import (
    LOOPBACK,
    STANDALONE_BIN,
    Origin,
    PortAllocator,
    StandaloneFactory,
    echo,
    echo_roundtrip,
    standalone_toml,
    wait_for,
)

N = 5


def _payload(i: int) -> bytes:
    """A distinct size per port offset, so per-port counters cannot be confused."""
    return bytes([65 + i]) * (1000 * (i + 1))


@pytest.fixture
def range_origins(ports: PortAllocator, origin_at: Callable[..., Origin]) -> int:
    """Five port-reporting TCP origins on consecutive ports; returns the first port."""
    first = ports.block(N)
    for i in range(N):
        origin_at(port_reporter, first + i)
    return first


@pytest.fixture
def udp_range_origin(ports: PortAllocator) -> Iterator[tuple[int, UdpPortEcho]]:
    first = ports.block(N)
    echo_srv = UdpPortEcho(list(range(first, first + N)))
    yield first, echo_srv
    echo_srv.close()


def foreign(port: int, proto: str) -> socket.socket:
    """Someone else's socket on ``port``: plain bind (and listen for TCP)."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.bind((LOOPBACK, port))
    if proto == "tcp":
        s.listen(1)
    return s


def all_free(first: int, proto: str) -> bool:
    return all(bindable(p, proto) for p in range(first, first + N))


# ----------------------------------------------------------------- standalone


def test_standalone_tcp_range_maps_each_port_to_its_offset(
    standalone: StandaloneFactory, ports: PortAllocator, range_origins: int
) -> None:
    listen = ports.block(N)
    proc = standalone(
        [
            {
                "name": "rng",
                "listen_ports": f"{listen}-{listen + N - 1}",
                "target": f"{LOOPBACK}:{range_origins}-{range_origins + N - 1}",
            }
        ]
    )
    for i in reversed(range(N)):  # out of order: the mapping is by offset, not by arrival
        assert reached_port(listen + i, _payload(i)) == range_origins + i

    # One rule, one metrics row: totals only, no per-port series on /metrics.
    sent = sum(len(_payload(i)) for i in range(N))
    back = sent + sum(len(f"{range_origins + i}\n") for i in range(N))

    def counted() -> bool:
        m = proc.scrape()
        return (
            m.value("portunus_rule_bytes_in_total", rule="rng") == sent
            and m.value("portunus_rule_bytes_out_total", rule="rng") == back
            and m.value("portunus_rule_connections_total", rule="rng") == N
        )

    wait_for(counted, 10, what="range totals on /metrics")
    m = proc.scrape()
    assert len(m.labels_of("portunus_rule_connections_total")) == 1
    assert not [n for n in m.samples if n.startswith("portunus_detail_")]
    assert not any("port" in lab for lab in m.labels_of("portunus_rule_bytes_in_total"))


def test_standalone_udp_range_maps_each_port_to_its_offset(
    standalone: StandaloneFactory, ports: PortAllocator, udp_range_origin: tuple[int, UdpPortEcho]
) -> None:
    target, origin = udp_range_origin
    listen = ports.block(N)
    proc = standalone(
        [
            {
                "name": "urng",
                "protocol": "udp",
                "listen_ports": f"{listen}-{listen + N - 1}",
                "targets": [{"host": LOOPBACK, "ports": f"{target}-{target + N - 1}"}],
            }
        ]
    )
    proc.wait_log("rule.activated", rule="urng")
    for i in range(N):
        reply = udp_exchange(listen + i, b"hi-%d" % i)
        assert reply == f"{target + i}:hi-{i}".encode()


@pytest.mark.parametrize(("proto", "busy_offset"), [("tcp", 2), ("tcp", N - 1), ("udp", N - 1)])
def test_standalone_busy_port_binds_nothing_of_the_range(
    standalone: StandaloneFactory,
    ports: PortAllocator,
    origin: Callable[..., Origin],
    proto: str,
    busy_offset: int,
) -> None:
    """Two shards, so the rollback has several sockets per port to close.  A second,
    healthy rule in the same file keeps working."""
    listen = ports.block(N)
    busy = listen + busy_offset
    other = origin(echo)
    other_port = ports.port()
    holder = foreign(busy, proto)
    try:
        proc = standalone(
            [
                {
                    "name": "rng",
                    "protocol": proto,
                    "listen_ports": f"{listen}-{listen + N - 1}",
                    "target": f"{LOOPBACK}:40000-{40000 + N - 1}",
                },
                {"name": "ok", "listen_port": other_port, "target": other.address},
            ],
            shards=2,
            ready=False,
        )
        failed = proc.wait_log("rule.failed", rule="rng")
        assert failed["reason"] == f"port_in_use (port {busy} already bound)"
        proc.wait_log("supervisor.ready")
        assert echo_roundtrip(other_port)
        others = [p for p in range(listen, listen + N) if p != busy]
        assert all(bindable(p, proto) for p in others), [
            p for p in others if not bindable(p, proto)
        ]
    finally:
        holder.close()
    assert all_free(listen, proto)
    assert proc.alive()


@pytest.mark.parametrize(
    ("listen", "target", "code"),
    [
        ("{lo}-{hi9}", "127.0.0.1:40000-40008", "validation.range_too_large"),
        ("{lo}-{hi4}", "127.0.0.1:40000-40003", "validation.range_length_mismatch"),
        ("{lo}-{hi4}", "127.0.0.1:40000", "validation.range_length_mismatch"),
    ],
)
def test_standalone_check_refuses_bad_ranges(
    tmp_path: Path, listen: str, target: str, code: str
) -> None:
    lo = 21000
    text = standalone_toml(
        {"range_rule_max_ports": 8},
        [
            {
                "name": "bad",
                "listen_ports": listen.format(lo=lo, hi9=lo + 8, hi4=lo + 4),
                "target": target,
            }
        ],
    )
    path = tmp_path / "bad.toml"
    path.write_text(text)
    res = subprocess.run(
        [STANDALONE_BIN, "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2, res
    assert code in res.stderr, res.stderr


# --------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def srv(server_module: ServerFactory) -> ServerProc:
    return server_module(shards=2, settings={"range_rule_max_ports": 16})


def _rules(srv: ServerProc) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in srv.cli_json("list-rules")["rules"]}


def test_server_tcp_range_forwards_and_reports_per_port(
    srv: ServerProc, ports: PortAllocator, range_origins: int
) -> None:
    listen = ports.block(N)
    rule = srv.cli_json(
        "push-rule",
        "local",
        f"{listen}-{listen + N - 1}",
        f"{LOOPBACK}:{range_origins}-{range_origins + N - 1}",
    )
    assert rule["state"] == "active"
    assert (rule["listen_port_start"], rule["listen_port_end"]) == (listen, listen + N - 1)
    try:
        for i in range(N):
            assert reached_port(listen + i, _payload(i)) == range_origins + i
        expect = [
            {
                "port": listen + i,
                "bytes_in": len(_payload(i)),
                "bytes_out": len(_payload(i)) + len(f"{range_origins + i}\n"),
                "connections_total": 1,
                "active_connections": 0,
            }
            for i in range(N)
        ]

        def per_port_cli() -> bool:
            return srv.cli_json("rule-stats", str(rule["id"]), "--per-port")["per_port"] == expect

        wait_for(per_port_cli, 10, what="rule-stats --per-port rows")
        stats = srv.cli_json("rule-stats", str(rule["id"]), "--per-port")
        assert stats["bytes_in"] == sum(r["bytes_in"] for r in expect)
        assert stats["bytes_out"] == sum(r["bytes_out"] for r in expect)
        assert stats["connections_total"] == N
        status, body = srv.http("GET", f"/v1/rules/{rule['id']}/stats?per_port=true")
        assert status == 200 and body["per_port"] == expect
        status, body = srv.http("GET", f"/v1/rules/{rule['id']}/stats")
        assert status == 200 and "per_port" not in body
        text = srv.cli("rule-stats", str(rule["id"]), "--per-port")
        assert text.code == 0 and all(str(listen + i) in text.out for i in range(N)), text
    finally:
        srv.remove_rule(rule["id"])


def test_server_udp_range_over_http_forwards_and_reports_per_port(
    srv: ServerProc, ports: PortAllocator, udp_range_origin: tuple[int, UdpPortEcho]
) -> None:
    target, _origin = udp_range_origin
    listen = ports.block(N)
    status, rule = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": "local",
            "protocol": "udp",
            "listen_port_start": listen,
            "listen_port_end": listen + N - 1,
            "targets": [{"host": LOOPBACK, "port_start": target, "port_end": target + N - 1}],
        },
    )
    assert status == 201, rule
    assert rule["state"] == "active" and rule["protocol"] == "udp"
    try:
        for i in range(N):
            assert udp_exchange(listen + i, _payload(i)) == f"{target + i}:".encode() + _payload(i)

        def per_port() -> list[tuple[int, int, int]]:
            st, body = srv.http("GET", f"/v1/rules/{rule['id']}/stats?per_port=true")
            assert st == 200, body
            return [(r["port"], r["bytes_in"], r["bytes_out"]) for r in body["per_port"]]

        expect = [
            (listen + i, len(_payload(i)), len(_payload(i)) + len(f"{target + i}:"))
            for i in range(N)
        ]
        wait_for(
            lambda: per_port() == expect,
            10,
            what=lambda: f"UDP per-port bytes {expect}, have {per_port()}",
        )
    finally:
        srv.remove_rule(rule["id"])


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_server_busy_port_fails_the_rule_and_binds_nothing(
    srv: ServerProc, ports: PortAllocator, proto: str
) -> None:
    listen = ports.block(N)
    busy = listen + N - 1  # the last port: every earlier one was bound and must be let go
    holder = foreign(busy, proto)
    try:
        res = srv.cli(
            "push-rule",
            "local",
            f"{listen}-{listen + N - 1}",
            f"{LOOPBACK}:40000-{40000 + N - 1}",
            "--protocol",
            proto,
        )
        assert res.code == 6, res
        assert f"activation_failed: port_in_use (port {busy} already bound)" in res.err, res.err
        failed = [
            r
            for r in _rules(srv).values()
            if r.get("listen_port_start") == listen and r["protocol"] == proto
        ]
        assert len(failed) == 1
        assert failed[0]["state"] == "failed"
        assert failed[0]["failure_reason"] == f"port_in_use (port {busy} already bound)"
        assert all(bindable(p, proto) for p in range(listen, busy))
    finally:
        holder.close()
    assert all_free(listen, proto)
    # The failed rule keeps its slot until removed; then the range can be pushed again.
    again = srv.cli(
        "push-rule",
        "local",
        f"{listen}-{listen + N - 1}",
        f"{LOOPBACK}:40000-{40000 + N - 1}",
        "--protocol",
        proto,
    )
    assert again.code == 10 and "port_conflict" in again.err, again
    srv.remove_rule(failed[0]["id"])
    rule = srv.cli_json(
        "push-rule",
        "local",
        f"{listen}-{listen + N - 1}",
        f"{LOOPBACK}:40000-{40000 + N - 1}",
        "--protocol",
        proto,
    )
    assert rule["state"] == "active"
    srv.remove_rule(rule["id"])
    wait_for(lambda: all_free(listen, proto), 10, what="range released after remove")


def test_server_busy_port_over_http_is_422_activation_failed(
    srv: ServerProc, ports: PortAllocator
) -> None:
    listen = ports.block(N)
    busy = listen + 1
    with foreign(busy, "tcp"):
        status, body = srv.http(
            "POST",
            "/v1/rules",
            {
                "client": "local",
                "listen_port_start": listen,
                "listen_port_end": listen + N - 1,
                "targets": [{"host": LOOPBACK, "port_start": 40000, "port_end": 40000 + N - 1}],
            },
        )
    assert status == 422, body
    assert body["error"]["code"] == "activation_failed"
    assert f"port_in_use (port {busy} already bound)" in body["error"]["message"]
    failed = [r for r in _rules(srv).values() if r.get("listen_port_start") == listen]
    assert [r["state"] for r in failed] == ["failed"]
    assert all_free(listen, "tcp")
    srv.remove_rule(failed[0]["id"])


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_server_range_validation_codes(srv: ServerProc, proto: str) -> None:
    """range_rule_max_ports = 16 in this server's server.toml."""
    lo = 21000
    too_large = srv.cli(
        "push-rule", "local", f"{lo}-{lo + 16}", f"{LOOPBACK}:40000-40016", "--protocol", proto
    )
    assert too_large.code == 2 and "validation.range_too_large" in too_large.err, too_large
    ok_size = srv.cli(
        "push-rule", "local", f"{lo}-{lo + 15}", f"{LOOPBACK}:40000-40014", "--protocol", proto
    )
    assert ok_size.code == 2 and "validation.range_length_mismatch" in ok_size.err, ok_size
    status, body = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": "local",
            "protocol": proto,
            "listen_port_start": lo,
            "listen_port_end": lo + 16,
            "targets": [{"host": LOOPBACK, "port_start": 40000, "port_end": 40016}],
        },
    )
    assert (status, body["error"]["code"]) == (400, "validation.range_too_large")
    status, body = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": "local",
            "protocol": proto,
            "listen_port_start": lo,
            "listen_port_end": lo + 4,
            "targets": [{"host": LOOPBACK, "port_start": 40000, "port_end": 40005}],
        },
    )
    assert (status, body["error"]["code"]) == (400, "validation.range_length_mismatch")
    status, body = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": "local",
            "protocol": proto,
            "listen_port_start": lo,
            "listen_port_end": lo + 4,
            "targets": [{"host": LOOPBACK, "port": 40000}],
        },
    )
    assert (status, body["error"]["code"]) == (400, "validation.range_length_mismatch")
    assert not [r for r in _rules(srv).values() if r.get("listen_port_start") == lo]


def test_standalone_reload_retries_a_failed_range(
    standalone: StandaloneFactory, ports: PortAllocator, range_origins: int
) -> None:
    """The operator frees the port and sends SIGHUP: the failed range binds now."""
    listen = ports.block(N)
    holder = foreign(listen + 3, "tcp")
    proc = standalone(
        [
            {
                "name": "retry",
                "listen_ports": f"{listen}-{listen + N - 1}",
                "target": f"{LOOPBACK}:{range_origins}-{range_origins + N - 1}",
            }
        ],
        ready=False,
    )
    proc.wait_log("rule.failed", rule="retry")
    proc.wait_log("supervisor.ready")
    holder.close()
    mark = proc.log_mark()
    proc.reload()
    proc.wait_log("rule.activated", since=mark, rule="retry")
    for i in range(N):
        assert reached_port(listen + i) == range_origins + i
