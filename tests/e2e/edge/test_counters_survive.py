"""Rule counters keep counting across restarts: ``rule-stats`` and /metrics totals
of a local rule survive a restart of ``serve`` (and a control respawn counts
nothing twice); an edge rule's totals survive a restart of its client, and the
server's /metrics exports them with the client's name as ``client``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.e2e.edge.clients import ClientFactory
from tests.e2e.edge.test_edge_server import push, start_edge, wait_connected
from tests.e2e.support import ServerProc, connect, echo, recv_exact, wait_for

PAYLOAD = b"x" * 1000


def _traffic(port: int, conns: int) -> None:
    for _ in range(conns):
        with connect(port) as s:
            s.sendall(PAYLOAD)
            assert recv_exact(s, len(PAYLOAD)) == PAYLOAD


def _stats(srv: ServerProc, rid: int) -> dict[str, int]:
    return srv.rpc("rules.stats", {"id": rid})


def _wait_stats(srv: ServerProc, rid: int, conns: int, timeout: float = 20.0) -> dict[str, int]:
    return wait_for(
        lambda: (
            (s := _stats(srv, rid))["connections_total"] == conns
            and s["bytes_in"] == conns * len(PAYLOAD)
            and s
        ),
        timeout,
        what=lambda: f"rule-stats {conns} connections: {_stats(srv, rid)}",
    )


def _metric(srv: ServerProc, name: str, rid: int) -> float:
    return srv.scrape().value(name, rule=str(rid))


def test_local_counters_survive_a_restart_of_serve(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=2)
    org = origin(echo)
    port = ports.port()
    rid = push(srv, "local", port, org.address)["id"]
    _traffic(port, 3)
    _wait_stats(srv, rid, 3)
    srv.restart()
    after = _stats(srv, rid)
    assert (
        after["connections_total"] == 3 and after["bytes_in"] == 3000 and after["bytes_out"] == 3000
    ), after
    wait_for(
        lambda: _metric(srv, "portunus_rule_connections_total", rid) == 3,
        10,
        what="/metrics carries the earlier run's total",
    )
    _traffic(port, 2)
    _wait_stats(srv, rid, 5)
    wait_for(
        lambda: _metric(srv, "portunus_rule_bytes_in_total", rid) == 5000,
        10,
        what="/metrics 5000 bytes in",
    )
    # A control respawn within the same run must not bank the live counts twice.
    control = srv.child("control")
    assert control is not None
    os.kill(control.pid, signal.SIGKILL)
    wait_for(
        lambda: (c := srv.child("control")) is not None and c.pid != control.pid,
        10,
        what="control back",
    )
    wait_for(srv.health_ok, 10, what="API back")
    assert _stats(srv, rid)["connections_total"] == 5
    srv.restart()
    _traffic(port, 1)
    _wait_stats(srv, rid, 6)


def test_edge_counters_survive_a_client_restart_and_reach_server_metrics(
    server, clients: ClientFactory, origin, ports, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=1)
    edge = start_edge(srv, clients, tmp_path, "edge-count", extra=["--stats-interval", "0.3"])
    org = origin(echo)
    port = ports.port()
    rid = push(srv, "edge-count", port, org.address)["id"]
    _traffic(port, 2)
    _wait_stats(srv, rid, 2)
    wait_for(
        lambda: (
            srv.scrape().value(
                "portunus_rule_connections_total", rule=str(rid), client="edge-count"
            )
            == 2
        ),
        10,
        what="the edge rule on the server's /metrics",
    )
    # Restart the client on the same data dir: its own counters start from zero.
    assert edge.proc.stop(signal.SIGTERM, timeout=30) == 0
    again = clients(
        edge.bundle,
        name="edge-count-2",
        data_dir=edge.proc.data_dir,
        extra=["--stats-interval", "0.3"],
    )
    wait_connected(srv, edge.client_id)
    assert again.alive()
    wait_for(lambda: _try(port), 10, what="the cached rule forwards again")
    _traffic(port, 1)
    total = _wait_stats(srv, rid, 4)  # 2 before + the probe connection + 1
    assert total["bytes_in"] == 4000
    # And across a restart of the server.
    srv.restart()
    wait_connected(srv, edge.client_id)
    _wait_stats(srv, rid, 4)
    wait_for(
        lambda: (
            srv.scrape().value("portunus_rule_bytes_in_total", rule=str(rid), client="edge-count")
            == 4000
        ),
        15,
        what="edge totals on /metrics after a server restart",
    )


def _try(port: int) -> bool:
    try:
        _traffic(port, 1)
        return True
    except OSError:
        return False
