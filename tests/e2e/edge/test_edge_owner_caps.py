"""Owner caps on remote edge clients: pushed over the edge link, enforced by the
client's shards, kept in its cache, replayed on every reconnect, and refused
(422) for a client that does not advertise ``rate_limit``."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from tests.e2e.edge.clients import ClientFactory
from tests.e2e.edge.test_edge_server import start_edge, wait_connected
from tests.e2e.features.helpers import ServerFactory, ServerProc
from tests.e2e.features.test_owner_caps import make_owner
from tests.e2e.support import Origin, PortAllocator, connect, echo, recv_exact, wait_for


def push_owned(
    srv: ServerProc, client: str, port: int, target: Origin, owner: str
) -> dict[str, Any]:
    make_owner(srv, owner)
    status, rule = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": client,
            "listen_port": port,
            "owner": owner,
            "targets": [{"host": "127.0.0.1", "port": target.port}],
        },
    )
    assert status == 201 and rule["state"] == "active", rule
    return rule


def admitted(port: int) -> socket.socket | None:
    """An open connection that echoes, or None when the data plane closed it at once."""
    s = connect(port, timeout=5)
    try:
        s.sendall(b"x")
        if recv_exact(s, 1) == b"x":
            return s
    except (ConnectionResetError, BrokenPipeError, EOFError, OSError):
        pass
    s.close()
    return None


def live_cap(ports: list[int], most: int) -> list[socket.socket]:
    """Open connections round-robin over ``ports`` until one is refused; exactly
    ``most`` must get in (the open ones are returned, for the caller to close)."""
    held: list[socket.socket] = []
    for i in range(most + 1):
        s = admitted(ports[i % len(ports)])
        if s is None:
            break
        held.append(s)
    if len(held) != most:
        for s in held:
            s.close()
        raise AssertionError(f"{len(held)} connections admitted, wanted {most}")
    return held


def cached_caps(data_dir: Path) -> dict[str, Any]:
    return dict(json.loads((data_dir / "rules.json").read_text()).get("owner_caps") or {})


def test_owner_caps_reach_the_edge_and_are_replayed_on_reconnect(
    server: ServerFactory, clients: ClientFactory, tmp_path: Path, ports: PortAllocator, origin: Any
) -> None:
    srv = server()
    edge = start_edge(srv, clients, tmp_path, "edge-oc")
    o: Origin = origin(echo)
    rule_ports = ports.ports(2)
    for p in rule_ports:
        push_owned(srv, "edge-oc", p, o, "ivy")
    mark = edge.proc.log_mark()
    res = srv.cli(
        "owner-cap", "set", "edge-oc", "ivy", "--concurrent-connections", "1", "--format", "json"
    )
    assert res.code == 0, res
    assert res.json["client_id"] == edge.client_id and res.json["rate_limit"] == {
        "concurrent_connections": 1
    }
    edge.proc.wait_log("link.owner_caps", since=mark, owners=1)
    for s in live_cap(rule_ports, 1):  # one connection over both rules of the owner
        s.close()
    wait_for(
        lambda: (
            edge.proc.scrape().value("portunus_rate_limit_refused_total", limit="owner_concurrent")
            >= 1
        ),
        5,
        what="the refusal counted on the edge",
    )
    assert cached_caps(edge.proc.data_dir) == {"ivy": {"concurrent_connections": 1}}

    # Changed while the client is away: stored, and sent when it comes back.
    assert edge.proc.stop() == 0
    wait_connected(srv, edge.client_id, connected=False)
    res = srv.cli("owner-cap", "set", "edge-oc", "ivy", "--concurrent-connections", "2")
    assert res.code == 0, res
    back = clients(edge.bundle, name="edge-oc-2", data_dir=edge.proc.data_dir)
    wait_connected(srv, edge.client_id)
    back.wait_log("link.owner_caps", owners=1)
    wait_for(
        lambda: cached_caps(back.data_dir) == {"ivy": {"concurrent_connections": 2}},
        5,
        what="the new caps cached",
    )
    held = wait_for(
        lambda: _try_cap(rule_ports, 2), 10, what="two connections admitted after the replay"
    )
    for s in held:
        s.close()

    # Deleted while away: the reconnect's empty set lifts the cached cap.
    assert back.stop() == 0
    wait_connected(srv, edge.client_id, connected=False)
    assert srv.cli("owner-cap", "delete", "edge-oc", "ivy").code == 0
    again = clients(edge.bundle, name="edge-oc-3", data_dir=edge.proc.data_dir)
    wait_connected(srv, edge.client_id)
    again.wait_log("link.owner_caps", owners=0)
    held = [s for s in (admitted(rule_ports[i % 2]) for i in range(4)) if s is not None]
    try:
        assert len(held) == 4, "the deleted cap still limits the owner"
    finally:
        for s in held:
            s.close()


def _try_cap(ports: list[int], most: int) -> list[socket.socket] | None:
    try:
        return live_cap(ports, most)
    except AssertionError:
        return None


def test_a_client_without_rate_limit_is_refused(
    server: ServerFactory, clients: ClientFactory, tmp_path: Path
) -> None:
    srv = server()
    edge = start_edge(
        srv, clients, tmp_path, "edge-norl", extra=["--disable-capability", "rate_limit"]
    )
    status, body = srv.http(
        "PUT", "/v1/clients/edge-norl/owners/ivy/rate-limit", {"bandwidth_in_bps": 1000}
    )
    assert status == 422 and body["error"]["code"] == "rate_limit_unsupported_by_client", body
    res = srv.cli("owner-cap", "set", edge.client_id, "ivy", "--bandwidth-in-bps", "1000")
    assert res.code == 1 and "rate_limit_unsupported_by_client" in res.err
    status, body = srv.http("GET", "/v1/clients/edge-norl/owners/ivy/rate-limit")
    assert status == 404 and body["error"]["code"] == "owner_cap_not_found"  # nothing was stored
    audit = srv.cli_json("audit")["entries"]
    assert any(
        e["action"] == "owner_cap.set" and e["error_code"] == "rate_limit_unsupported_by_client"
        for e in audit
    )
