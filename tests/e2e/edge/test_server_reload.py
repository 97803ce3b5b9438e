"""``kill -HUP`` on ``serve`` is a real reload: server.toml is re-read and
validated; reloadable keys apply with no process restarted, no edge link dropped
and no connection refused; keys that need a restart are named in
``config.restart_required``; an invalid file changes nothing and logs every
``file:line``.  ``check-config`` says the same without touching the service."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.e2e.edge.clients import ClientFactory
from tests.e2e.edge.test_edge_server import push, start_edge
from tests.e2e.server.loops import EchoLoop
from tests.e2e.support import LOOPBACK, ServerProc, connect, echo, recv_exact


def _pids(proc) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {title: p.pid for title, p in proc.titled().items()}


def _roundtrip(sock, data: bytes) -> bool:  # type: ignore[no-untyped-def]
    sock.sendall(data)
    return recv_exact(sock, len(data)) == data


def test_reload_applies_settings_without_restarting_anything(
    server, clients: ClientFactory, origin, ports, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=2)
    edge = start_edge(srv, clients, tmp_path, "edge-reload")
    org = origin(echo)
    local_port, edge_port = ports.ports(2)
    assert push(srv, "local", local_port, org.address)["state"] == "active"
    assert push(srv, "edge-reload", edge_port, org.address)["state"] == "active"
    server_pids, edge_pids = _pids(srv), _pids(edge.proc)
    assert {"portunus: control", "portunus: web", "portunus: shard 0", "portunus: shard 1"} <= set(
        server_pids
    )
    links_before = len(edge.proc.events("link.connected"))
    old_metrics = srv.settings["metrics_listen"]
    held_local, held_edge = connect(local_port), connect(edge_port)
    try:
        assert _roundtrip(held_local, b"before\n") and _roundtrip(held_edge, b"before\n")
        with EchoLoop(local_port, threads=2) as loop:
            loop.wait_ok(100)
            srv.write_config(
                {
                    "range_rule_max_ports": 4,
                    "udp_max_flows": 7,
                    "shutdown_drain_timeout_secs": 3,
                    "log_level": "debug",
                    "metrics_listen": f"{LOOPBACK}:{ports.port()}",
                }
            )
            mark = srv.log_mark()
            srv.send_signal(signal.SIGHUP)
            rec = srv.wait_log("config.reloaded", since=mark)
            loop.mark()
            loop.wait_ok(200, after_mark=True)
            stats = loop.stop()
        assert stats.failures == 0, (stats.connect_failures[:3], stats.resets[:3], stats.other[:3])
        assert rec["changed"] == [
            "log_level",
            "range_rule_max_ports",
            "shutdown_drain_timeout_secs",
            "udp_max_flows",
        ], rec
        assert rec["restart_required"] == ["metrics_listen"], rec
        need = srv.wait_log("config.restart_required", since=mark)
        assert need["keys"] == ["metrics_listen"] and need["level"] == "warning"
        # Open connections, local and through the edge, carry on.
        assert _roundtrip(held_local, b"after\n") and _roundtrip(held_edge, b"after\n")
    finally:
        held_local.close()
        held_edge.close()
    assert _pids(srv) == server_pids, "a process of serve was restarted by the reload"
    assert _pids(edge.proc) == edge_pids
    assert len(edge.proc.events("link.connected")) == links_before, "the edge link dropped"
    assert srv.events("edge.disconnected", since=mark) == []
    # Control took range_rule_max_ports = 4: a 5-port range is now too large.
    lo = ports.block(5)
    res = srv.cli("push-rule", "local", f"{lo}-{lo + 4}", "127.0.0.1:9-13")
    assert res.code == 2 and "range" in res.err, res
    # metrics_listen needs a restart: the old address still serves.
    assert srv.metrics_port == int(old_metrics.rsplit(":", 1)[1])
    assert (
        srv.scrape().value("portunus_rule_connections_total", rule=str(push_id(srv, local_port)))
        > 0
    )


def push_id(srv: ServerProc, port: int) -> int:
    return next(rid for rid, r in srv.rules().items() if r.get("listen_port") == port)


def test_invalid_reload_changes_nothing(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=1)
    org = origin(echo)
    port = ports.port()
    push(srv, "local", port, org.address)
    pids = _pids(srv)
    srv.config_path.write_text(
        'log_level = "loud"\nshutdown_drain_timeout_secs = "soon"\nbogus = 1\n'
    )
    mark = srv.log_mark()
    srv.send_signal(signal.SIGHUP)
    rec = srv.wait_log(("config.invalid", "config.reloaded"), since=mark)
    assert rec["event"] == "config.invalid" and rec["level"] == "error", rec
    path = str(srv.config_path)
    assert [e.split(":", 2)[:2] for e in rec["errors"]] == [
        [path, "1"],
        [path, "2"],
        [path, "3"],
    ], rec["errors"]
    assert _pids(srv) == pids and srv.health_ok()
    with connect(port) as s:
        assert _roundtrip(s, b"still\n")
    res = srv.cli("check-config")
    assert res.code == 2, res
    assert [ln.split(":", 2)[1] for ln in res.err.splitlines() if ln.startswith(path)] == [
        "1",
        "2",
        "3",
    ], res.err
    srv.write_config()  # the fixture's valid file again
    ok = srv.cli("check-config", "--config", path)
    assert ok.code == 0 and ok.out.strip() == f"{path}: ok", ok
