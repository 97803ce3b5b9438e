"""Multi-target failover: priority order, fall-through inside one client connection,
down after 3 failed connects, back after 2 health checks, all-down fallback —
standalone TOML (``targets = [...]``) and the server (``--target host:port@prio``).

Origins report their own port, so every reply says which target served it; a
restarted origin also records the health probes (bare connects) it receives.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from tests.e2e.features.helpers import (
    ServerFactory,
    port_reporter,
    reached_port,
)
from tests.e2e.support import (
    LOOPBACK,
    ManagedProc,
    Metrics,
    Origin,
    PortAllocator,
    StandaloneFactory,
    wait_for,
)

PAYLOAD = b"failover payload\n" * 64


def target_up(scrape: Callable[[], Metrics], rule: str, port: int) -> float:
    return scrape().value("portunus_target_up", -1.0, rule=rule, target=f"{LOOPBACK}:{port}")


def connect_failures(proc: ManagedProc, port: int, since: int) -> int:
    return len(proc.events("tcp.connect_failed", since=since, target=f"{LOOPBACK}:{port}"))


def closed_by_portunus(port: int) -> bool:
    """Connect, and see Portunus close the connection without any origin answering."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        try:
            return s.recv(64) == b""
        except ConnectionResetError:
            return True


def exercise_failover(
    proc: ManagedProc,
    scrape: Callable[[], Metrics],
    rule: str,
    listen: int,
    a: Origin,
    b: Origin,
    origin_at: Callable[..., Origin],
) -> Origin:
    """The whole story on a running rule (primary ``a``, backup ``b``, checks every
    0.5 s); returns the restarted primary."""
    for _ in range(3):
        assert reached_port(listen, PAYLOAD) == a.port
    assert not b.records
    assert target_up(scrape, rule, a.port) == 1 and target_up(scrape, rule, b.port) == 1

    mark = proc.log_mark()
    a_port = a.port
    a.close()
    # Each of the next connections tries the dead primary first, then the backup,
    # inside the same client connection: the client only ever sees the backup answer.
    # The native relay reports a failed connect from its own thread: the log line may
    # come a moment after the client already has the backup's answer.
    for i in range(2):
        assert reached_port(listen, PAYLOAD) == b.port
        wait_for(
            lambda n=i + 1: connect_failures(proc, a_port, mark) >= n,
            5,
            what=f"{i + 1} logged connect failures to the primary",
        )
        assert connect_failures(proc, a_port, mark) == i + 1
    assert target_up(scrape, rule, a_port) == 1, "marked down after only 2 failures"
    assert reached_port(listen, PAYLOAD) == b.port
    proc.wait_log("target.down", since=mark, rule=rule, target=f"{LOOPBACK}:{a_port}")
    wait_for(lambda: target_up(scrape, rule, a_port) == 0, 5, what="target_up of the primary = 0")
    # Down: no longer tried at all.
    for _ in range(3):
        assert reached_port(listen, PAYLOAD) == b.port
    assert connect_failures(proc, a_port, mark) == 3
    assert target_up(scrape, rule, b.port) == 1

    mark = proc.log_mark()
    back = origin_at(port_reporter, a_port)
    proc.wait_log("target.up", since=mark, timeout=5, rule=rule, target=f"{LOOPBACK}:{a_port}")
    # Exactly the 2 successful health probes, before any client connection.  A probe
    # succeeds once the kernel completes the handshake, which can be before the
    # origin's accept thread has recorded it: wait for the record, then count.
    wait_for(lambda: len(back.records) >= 2, 2, what="the origin to record both health probes")
    assert len(back.records) == 2
    wait_for(lambda: target_up(scrape, rule, a_port) == 1, 5, what="target_up of the primary = 1")
    for _ in range(3):
        assert reached_port(listen, PAYLOAD) == a_port
    return back


def test_standalone_failover_and_recovery(
    standalone: StandaloneFactory, ports: PortAllocator, origin_at: Callable[..., Origin]
) -> None:
    a = origin_at(port_reporter, ports.port())
    b = origin_at(port_reporter, ports.port())
    listen = ports.port()
    proc = standalone(
        [
            {
                "name": "fo",
                "listen_port": listen,
                "health_check_interval_secs": 0.5,
                # Listed backup first: the order comes from the priorities, not the list.
                "targets": [
                    {"host": LOOPBACK, "port": b.port, "priority": 2},
                    {"host": LOOPBACK, "port": a.port, "priority": 1},
                ],
            }
        ]
    )
    exercise_failover(proc, proc.scrape, "fo", listen, a, b, origin_at)
    assert proc.scrape().value("portunus_rule_connect_failures_total", rule="fo") == 0


def test_standalone_all_targets_down_are_tried_in_priority_order(
    standalone: StandaloneFactory, ports: PortAllocator, origin_at: Callable[..., Origin]
) -> None:
    """Health checks far apart (60 s) so only the all-down rule can bring traffic back."""
    a = origin_at(port_reporter, ports.port())
    b = origin_at(port_reporter, ports.port())
    a_port, b_port = a.port, b.port
    listen = ports.port()
    proc = standalone(
        [
            {
                "name": "alldown",
                "listen_port": listen,
                "health_check_interval_secs": 60,
                "targets": [
                    {"host": LOOPBACK, "port": a_port, "priority": 1},
                    {"host": LOOPBACK, "port": b_port, "priority": 2},
                ],
            }
        ]
    )
    assert reached_port(listen) == a_port
    a.close()
    b.close()
    for _ in range(3):
        assert closed_by_portunus(listen)
    wait_for(
        lambda: (
            (target_up(proc.scrape, "alldown", a_port), target_up(proc.scrape, "alldown", b_port))
            == (0, 0)
        ),
        5,
        what="both targets down",
    )
    assert proc.scrape().value("portunus_rule_connect_failures_total", rule="alldown") == 3
    b2 = origin_at(port_reporter, b_port)
    assert reached_port(listen, PAYLOAD) == b_port  # primary refused, backup tried anyway
    a2 = origin_at(port_reporter, a_port)
    assert reached_port(listen, PAYLOAD) == a_port  # every target down: priority order
    assert len(b2.records) == 1 and len(a2.records) == 1


def _per_target(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["target"]: row for row in stats["per_target"]}


def test_server_failover_with_target_flags_and_per_target_stats(
    server: ServerFactory, ports: PortAllocator, origin_at: Callable[..., Origin]
) -> None:
    srv = server()
    a = origin_at(port_reporter, ports.port())
    b = origin_at(port_reporter, ports.port())
    a_port, b_port = a.port, b.port
    listen = ports.port()
    rule = srv.cli_json(
        "push-rule",
        "local",
        str(listen),
        "--target",
        f"{LOOPBACK}:{b_port}@2",
        "--target",
        f"{LOOPBACK}:{a_port}@1",
        "--health-check-interval-secs",
        "0.5",
    )
    assert rule["state"] == "active"
    assert sorted((t["port"], t["priority"]) for t in rule["targets"]) == [(a_port, 1), (b_port, 2)]
    assert rule["health_check_interval_secs"] == 0.5
    rid = str(rule["id"])

    back = exercise_failover(srv, srv.scrape, rid, listen, a, b, origin_at)

    rows = _per_target(srv.cli_json("rule-stats", rid, "--per-target"))
    ta, tb = f"{LOOPBACK}:{a_port}", f"{LOOPBACK}:{b_port}"
    assert set(rows) == {ta, tb}
    assert (rows[ta]["priority"], rows[ta]["up"]) == (1, True)
    assert (rows[tb]["priority"], rows[tb]["up"]) == (2, True)
    assert rows[ta]["connect_failures_total"] == 3
    assert rows[tb]["connect_failures_total"] == 0
    assert rows[ta]["connections_total"] == 6  # 3 before the kill, 3 after recovery
    assert rows[tb]["connections_total"] == 6
    text = srv.cli("rule-stats", rid, "--per-target")
    assert text.code == 0 and ta in text.out and tb in text.out, text

    # Down again, seen through the HTTP flavour of the same stats.
    back.close()
    for _ in range(3):
        assert reached_port(listen) == b_port
    wait_for(
        lambda: (
            _per_target(srv.http("GET", f"/v1/rules/{rid}/stats?per_target=true")[1])[ta]["up"]
            is False
        ),
        5,
        what="per_target up=false over HTTP",
    )


def test_server_positional_target_is_priority_1(
    server: ServerFactory, ports: PortAllocator, origin_at: Callable[..., Origin]
) -> None:
    srv = server()
    a = origin_at(port_reporter, ports.port())
    b = origin_at(port_reporter, ports.port())
    listen = ports.port()
    rule = srv.cli_json(
        "push-rule",
        "local",
        str(listen),
        f"{LOOPBACK}:{a.port}",
        "--target",
        f"{LOOPBACK}:{b.port}@2",
    )
    assert sorted((t["port"], t["priority"]) for t in rule["targets"]) == [(a.port, 1), (b.port, 2)]
    assert reached_port(listen) == a.port
    a.close()
    assert reached_port(listen) == b.port


class Blackhole:
    """A listener whose accept queue is full: further SYNs go unanswered, so a
    connect to it hangs until the connecting side gives up (a dead host, not a
    refusing one)."""

    def __init__(self) -> None:
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind((LOOPBACK, 0))
        self.lsock.listen(0)
        self.port: int = self.lsock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(4):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(0.3)
            try:
                c.connect((LOOPBACK, self.port))
            except TimeoutError:
                c.close()
                break
            self.fillers.append(c)

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.lsock.close()


def test_standalone_unresponsive_primary_times_out_into_the_backup(
    standalone: StandaloneFactory, ports: PortAllocator, origin_at: Callable[..., Origin]
) -> None:
    """connect_timeout_secs = 0.5: a primary that never answers costs each of the
    first 3 clients ~0.5 s, then it is down and skipped."""
    hole = Blackhole()
    try:
        b = origin_at(port_reporter, ports.port())
        listen = ports.port()
        proc = standalone(
            [
                {
                    "name": "hang",
                    "listen_port": listen,
                    "health_check_interval_secs": 60,
                    "targets": [
                        {"host": LOOPBACK, "port": hole.port, "priority": 1},
                        {"host": LOOPBACK, "port": b.port, "priority": 2},
                    ],
                }
            ],
            settings={"connect_timeout_secs": 0.5},
        )
        for _ in range(3):
            t0 = time.monotonic()
            assert reached_port(listen, PAYLOAD, timeout=10) == b.port
            assert 0.4 <= time.monotonic() - t0 < 2.0
        wait_for(
            lambda: target_up(proc.scrape, "hang", hole.port) == 0,
            5,
            what="the unresponsive primary marked down",
        )
        t0 = time.monotonic()
        assert reached_port(listen, PAYLOAD) == b.port
        assert time.monotonic() - t0 < 0.3, "a down target is still being tried"
        assert (
            len(
                proc.events("tcp.connect_failed", target=f"{LOOPBACK}:{hole.port}", error="timeout")
            )
            == 3
        )
    finally:
        hole.close()


def test_server_refuses_more_than_8_targets(server: ServerFactory) -> None:
    srv = server()
    flags = [x for i in range(9) for x in ("--target", f"{LOOPBACK}:{40000 + i}@{i + 1}")]
    res = srv.cli("push-rule", "local", "21000", *flags)
    assert res.code == 2 and "validation.targets" in res.err, res
    status, body = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": "local",
            "listen_port": 21000,
            "targets": [{"host": LOOPBACK, "port": 40000 + i, "priority": i + 1} for i in range(9)],
        },
    )
    assert (status, body["error"]["code"]) == (400, "validation.targets"), body
