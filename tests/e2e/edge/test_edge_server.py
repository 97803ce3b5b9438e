"""Remote edge clients end to end: the real ``portunus-server`` and real
``portunus-client`` processes on loopback, driven like an operator would (CLI and
/v1), each client with its own ports and data dir.
"""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.e2e.edge.clients import ClientFactory, ClientProc, enroll
from tests.e2e.features.helpers import ServerFactory, ServerProc
from tests.e2e.support import (
    Origin,
    PortAllocator,
    connect,
    connection_refused,
    echo,
    echo_roundtrip,
    recv_exact,
    wait_for,
)

# ------------------------------------------------------------------ helpers


def mint(srv: ServerProc, name: str, ttl: int = 600) -> dict[str, Any]:
    status, body = srv.http(
        "POST", "/v1/client-enrollments", {"name": name, "address": "127.0.0.1", "ttl_secs": ttl}
    )
    assert status == 201, body
    assert body["command"] == f"portunus-client enroll '{body['uri']}'"
    return body


def clients_rows(srv: ServerProc) -> dict[str, dict[str, Any]]:
    status, body = srv.http("GET", "/v1/clients")
    assert status == 200, body
    return {row["client_id"]: row for row in body["clients"]}


def row(srv: ServerProc, client_id: str) -> dict[str, Any]:
    return clients_rows(srv)[client_id]


def wait_connected(
    srv: ServerProc, client_id: str, connected: bool = True, timeout: float = 30.0
) -> dict[str, Any]:
    """Wait until the client's row says ``connected``; a row that is gone (a revoked
    client may be hidden) counts as not connected."""

    def check() -> dict[str, Any] | None:
        r = clients_rows(srv).get(client_id)
        if r is None:
            return None if connected else {"connected": False}
        return r if r["connected"] is connected else None

    return wait_for(
        check,
        timeout,
        what=lambda: f"client {client_id} connected={connected}: {clients_rows(srv)}",
    )


class Edge:
    """An enrolled, running client: its process, bundle and id."""

    def __init__(self, proc: ClientProc, bundle: Path, client_id: str, name: str) -> None:
        self.proc, self.bundle, self.client_id, self.name = proc, bundle, client_id, name


def start_edge(
    srv: ServerProc,
    clients: ClientFactory,
    tmp_path: Path,
    name: str,
    extra: list[str] | None = None,
) -> Edge:
    minted = mint(srv, name)
    bundle = tmp_path / f"{name}.json"
    res = enroll(minted["uri"], bundle)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    proc = clients(bundle, extra=extra, name=name)
    wait_connected(srv, minted["client_id"])
    return Edge(proc, bundle, minted["client_id"], name)


def push(srv: ServerProc, client: str, listen: int, target: str, *flags: str) -> dict[str, Any]:
    res = srv.cli("push-rule", client, str(listen), target, *flags, "--format", "json")
    assert res.code == 0, res
    return res.json


def restart(srv: ServerProc, timeout: float = 30.0) -> None:
    """Start a killed server again on the same data dir and ports."""
    mark = srv.log_mark()
    srv.proc = None
    srv.start()
    srv.wait_log("supervisor.ready", since=mark, timeout=timeout)
    wait_for(
        lambda: srv.http("GET", "/v1/health")[0] == 200, timeout, what="the restarted server's API"
    )


async def _hello(server: str, fingerprint: str, token: str, client_id: str) -> dict[str, Any]:
    from portunus.edge.pinning import close_quietly, open_pinned
    from portunus.ipc.edge_wire import read_frame, write_frame

    host, _, port = server.rpartition(":")
    reader, writer = await open_pinned(host, int(port), fingerprint)
    try:
        await write_frame(
            writer,
            {
                "type": "hello",
                "token": token,
                "client_id": client_id,
                "version": "0.1.0",
                "capabilities": ["tcp"],
            },
        )
        return await asyncio.wait_for(read_frame(reader), 10)
    finally:
        await close_quietly(writer)


# ------------------------------------------------------------------ tests


def test_enroll_connect_push_and_bytes_flow(
    server: ServerFactory, clients: ClientFactory, tmp_path: Path, ports: PortAllocator, origin: Any
) -> None:
    srv = server()
    edge = start_edge(srv, clients, tmp_path, "edge-01", extra=["--stats-interval", "1"])
    r = row(srv, edge.client_id)
    assert (
        r["client_name"] == "edge-01" and r["version"] and r["remote_addr"].startswith("127.0.0.1:")
    )
    assert set(r["capabilities"]) >= {"tcp", "udp", "sni", "proxy_protocol"}
    assert srv.scrape().value("portunus_clients_connected") == 1

    o: Origin = origin(echo)
    port = ports.port()
    rule = push(srv, "edge-01", port, o.address)
    assert (
        rule["state"] == "active"
        and rule["client"] == "edge-01"
        and rule["client_id"] == edge.client_id
    )
    payload = b"through the edge " * 100
    assert echo_roundtrip(port, payload)
    # Counters travel back in stats frames; rule-stats on the server shows them.
    stats = wait_for(
        lambda: (
            (s := srv.cli_json("rule-stats", str(rule["id"])))["bytes_in"] >= len(payload) and s
        ),
        20,
        what="rule-stats to count the bytes",
    )
    assert stats["bytes_out"] >= len(payload)
    per_target = wait_for(
        lambda: (
            (t := srv.cli_json("rule-stats", str(rule["id"]), "--per-target")["per_target"])
            and t[0]["connections_total"] >= 1
            and t
        ),
        20,
        what="per-target rows from the edge",
    )
    assert per_target[0]["target"] == o.address and per_target[0]["up"] is True
    listed = srv.cli_json("list-clients")["clients"]
    assert any(
        c["client_id"] == edge.client_id and c["connected"] and c["rule_count"] == 1 for c in listed
    )


@pytest.mark.parametrize("why", ["used", "expired"])
def test_used_or_expired_code_is_refused(server: ServerFactory, tmp_path: Path, why: str) -> None:
    srv = server()
    minted = mint(srv, "edge-01", ttl=1 if why == "expired" else 600)
    if why == "used":
        assert enroll(minted["uri"], tmp_path / "first.json").returncode == 0
    else:
        time.sleep(1.5)
    res = enroll(minted["uri"], tmp_path / "second.json")
    assert res.returncode != 0
    assert "enrollment_invalid" in res.stderr, res.stderr
    assert not (tmp_path / "second.json").exists()


def test_tampered_fingerprint_is_refused(server: ServerFactory, tmp_path: Path) -> None:
    srv = server()
    uri = mint(srv, "edge-01")["uri"]
    real = parse_qs(urlsplit(uri).query)["fp"][0]
    fake = "sha256:" + ("0" if real[7] != "0" else "1") + real[8:]
    res = enroll(uri.replace(real, fake), tmp_path / "b.json")
    assert res.returncode != 0
    assert fake in res.stderr and real in res.stderr, res.stderr
    assert not (tmp_path / "b.json").exists()
    # Nothing was sent: the code still works with the right pin.
    assert enroll(uri, tmp_path / "b.json").returncode == 0


def test_server_killed_and_back(
    server: ServerFactory, clients: ClientFactory, tmp_path: Path, ports: PortAllocator, origin: Any
) -> None:
    srv = server()
    edge = start_edge(srv, clients, tmp_path, "edge-01")
    o: Origin = origin(echo)
    edge_port, local_port = ports.ports(2)
    push(srv, "edge-01", edge_port, o.address)
    held = connect(edge_port)
    held.sendall(b"one")
    assert recv_exact(held, 3) == b"one"

    srv.kill_tree()  # SIGKILL, no goodbye
    edge.proc.wait_log("link.disconnected", timeout=20)
    assert echo_roundtrip(edge_port), "the client must keep forwarding without its server"
    held.sendall(b"two")
    assert recv_exact(held, 3) == b"two"

    restart(srv)
    local_rule = push(srv, "local", local_port, o.address)  # pushed while the edge is reconnecting
    assert local_rule["state"] == "active"
    wait_connected(srv, edge.client_id, timeout=40)
    assert echo_roundtrip(local_port) and echo_roundtrip(edge_port)
    held.sendall(b"three")  # the reconnect's full sync did not touch the unchanged rule
    assert recv_exact(held, 5) == b"three"
    held.close()


def test_client_away_push_refused_and_removals_drained(
    server: ServerFactory, clients: ClientFactory, tmp_path: Path, ports: PortAllocator, origin: Any
) -> None:
    srv = server()
    edge = start_edge(srv, clients, tmp_path, "edge-01")
    o: Origin = origin(echo)
    keep, drop, refused = ports.ports(3)
    push(srv, "edge-01", keep, o.address)
    gone = push(srv, "edge-01", drop, o.address)
    assert echo_roundtrip(drop)

    assert edge.proc.stop(signal.SIGTERM, timeout=30) == 0
    wait_connected(srv, edge.client_id, connected=False, timeout=20)
    res = srv.cli("push-rule", "edge-01", str(refused), o.address)
    assert res.code == 8 and "client_not_connected" in res.err, res
    assert all(
        r["listen_port"] != refused
        for r in srv.cli_json("list-rules", "--client", "edge-01")["rules"]
    )
    rm = srv.cli("remove-rule", str(gone["id"]))
    assert rm.code == 0, rm

    # The edge comes back with its cache (both rules), then reconciles with the server.
    back = clients(edge.bundle, name="edge-01-back", data_dir=edge.proc.data_dir)
    wait_connected(srv, edge.client_id)
    wait_for(lambda: connection_refused(drop), 15, what=f"removed rule's port {drop} drained")
    assert echo_roundtrip(keep)
    assert sorted(r["listen_start"] for r in back.cached_rules()) == [keep]
    wait_for(
        lambda: all(r["id"] != gone["id"] for r in srv.cli_json("list-rules")["rules"]),
        15,
        what="the removed rule's row to go",
    )


def test_revoke_disconnects_and_kills_the_token(
    server: ServerFactory, clients: ClientFactory, tmp_path: Path
) -> None:
    srv = server()
    edge = start_edge(srv, clients, tmp_path, "edge-01")
    bundle = json.loads(edge.bundle.read_text())
    t0 = time.monotonic()
    res = srv.cli("revoke", edge.client_id)
    assert res.code == 0, res
    wait_connected(srv, edge.client_id, connected=False, timeout=5)
    assert time.monotonic() - t0 < 3.0
    assert edge.proc.wait_exit(30) == 4
    assert "revoked" in edge.proc.stderr_text()
    reply = asyncio.run(
        _hello(bundle["server"], bundle["fingerprint"], bundle["token"], bundle["client_id"])
    )
    assert reply["type"] == "error" and reply["code"] in ("revoked", "unauthenticated"), reply


def test_rename_under_a_live_session(
    server: ServerFactory, clients: ClientFactory, tmp_path: Path, ports: PortAllocator, origin: Any
) -> None:
    srv = server()
    edge = start_edge(srv, clients, tmp_path, "edge-01")
    o: Origin = origin(echo)
    port = ports.port()
    rule = push(srv, "edge-01", port, o.address)
    before = row(srv, edge.client_id)
    held = connect(port)
    res = srv.cli("rename-client", edge.client_id, "--name", "edge-paris")
    assert res.code == 0, res
    after = wait_for(
        lambda: (r := row(srv, edge.client_id))["client_name"] == "edge-paris" and r, 10
    )
    assert after["connected"] and after["connected_since"] == before["connected_since"]
    wait_for(
        lambda: json.loads(edge.bundle.read_text())["client_name"] == "edge-paris",
        10,
        what="the client to learn its new name",
    )
    assert len(edge.proc.events("link.connected")) == 1, "rename must not drop the session"
    rules = srv.cli_json("list-rules", "--client", "edge-paris")["rules"]
    assert [(r["id"], r["client_id"]) for r in rules] == [(rule["id"], edge.client_id)]
    held.sendall(b"still")
    assert recv_exact(held, 5) == b"still"
    held.close()
    assert echo_roundtrip(port)


def test_capability_gate(
    server: ServerFactory, clients: ClientFactory, tmp_path: Path, ports: PortAllocator, origin: Any
) -> None:
    srv = server()
    start_edge(srv, clients, tmp_path, "edge-nosni", extra=["--disable-capability", "sni"])
    o: Origin = origin(echo)
    port = ports.port()
    status, body = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": "edge-nosni",
            "listen_port": port,
            "targets": [{"host": "127.0.0.1", "port": o.port}],
            "sni_pattern": "api.example.com",
        },
    )
    assert status == 422 and body["error"]["code"] == "sni_unsupported_by_client", body
    res = srv.cli("push-rule", "edge-nosni", str(port), o.address, "--sni", "api.example.com")
    assert res.code != 0 and "sni_unsupported_by_client" in res.err
    # Without SNI the same client takes the rule.
    assert push(srv, "edge-nosni", port, o.address)["state"] == "active"


def test_a_frozen_server_is_declared_dead_within_30s(
    server: ServerFactory, clients: ClientFactory, tmp_path: Path, ports: PortAllocator, origin: Any
) -> None:
    srv = server()
    edge = start_edge(srv, clients, tmp_path, "edge-01")
    o: Origin = origin(echo)
    port = ports.port()
    push(srv, "edge-01", port, o.address)
    control = srv.titled()["portunus: control"]
    mark = edge.proc.log_mark()
    control.send_signal(signal.SIGSTOP)  # TCP stays up, nothing answers: only heartbeats can tell
    try:
        t0 = time.monotonic()
        edge.proc.wait_log("link.dead", since=mark, timeout=35)
        silent = time.monotonic() - t0
        # The client's hello advertises quiet_link: the welcome's dead interval is 30 s
        # (15 s for clients without it, tests/unit/edge/test_link.py).
        assert silent <= 30.5, f"dead link noticed after {silent:.1f} s"
        assert echo_roundtrip(port), "forwarding must not depend on the link"
    finally:
        control.send_signal(signal.SIGCONT)
    edge.proc.wait_connected(since=mark, timeout=40)
    wait_connected(srv, edge.client_id)
