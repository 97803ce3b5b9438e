"""Cascades with a remote edge client connected: ``user-remove`` and
``grant-revoke`` remove the affected rules through the ordinary remove path,
on the server's own node and on the edge alike, and the ports really stop
forwarding."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.edge.clients import ClientFactory
from tests.e2e.edge.test_edge_server import start_edge
from tests.e2e.server.rbac_world import make_world
from tests.e2e.support import (
    Origin,
    OriginFactory,
    PortAllocator,
    ServerFactory,
    connection_refused,
    echo,
    echo_roundtrip,
    wait_for,
)


def _push(world, who: str, client: str, port: int, origin: Origin) -> int:  # type: ignore[no-untyped-def]
    res = world.srv.cli(
        "push-rule", client, str(port), origin.address, "--format", "json", token=world.tokens[who]
    )
    assert res.code == 0, res.err
    assert res.json["owner"] == who and res.json["state"] == "active"
    return int(res.json["id"])


def _forwarding(port: int) -> bool:
    try:
        return echo_roundtrip(port, b"hello\n", timeout=3.0)
    except OSError:
        return False


def test_user_remove_and_grant_revoke_drain_rules_on_local_and_edge(
    server: ServerFactory,
    clients: ClientFactory,
    origin: OriginFactory,
    ports: PortAllocator,
    tmp_path: Path,
) -> None:
    srv = server(shards=1)
    world = make_world(srv, ports)
    edge = start_edge(srv, clients, tmp_path, "edge-rbac")
    edge_lo = ports.block(8)
    for who in ("alice", "carol"):
        world.rpc(
            "grants.add",
            {
                "user_id": who,
                "client": "edge-rbac",
                "listen_port_start": edge_lo,
                "listen_port_end": edge_lo + 7,
                "protocols": ["tcp"],
            },
        )
    o = origin(echo)
    alice_local = world.port_of("alice")
    alice_rules = [
        _push(world, "alice", "local", alice_local, o),
        _push(world, "alice", "edge-rbac", edge_lo, o),
    ]
    carol_local = world.port_of("carol")
    carol_local_rule = _push(world, "carol", "local", carol_local, o)
    carol_edge_rule = _push(world, "carol", "edge-rbac", edge_lo + 1, o)
    for port in (alice_local, edge_lo, carol_local, edge_lo + 1):
        wait_for(lambda p=port: _forwarding(p), 15, what=f"port {port} forwarding")  # type: ignore[misc]

    # user-remove: every rule of alice (local and edge) drained, tokens and grants gone.
    grants = [g["grant_id"] for g in world.rpc("grants.list", {"user_id": "alice"})["grants"]]
    tokens = [t["token_id"] for t in world.rpc("tokens.list", {"user_id": "alice"})["tokens"]]
    res = srv.cli("user-remove", "alice", "--format", "json", token=world.tokens["root"])
    assert res.code == 0, res.err
    assert res.json == {
        "user_id": "alice",
        "removed_rule_ids": alice_rules,
        "revoked_grant_ids": grants,
        "revoked_token_ids": tokens,
    }
    for port in (alice_local, edge_lo):
        wait_for(lambda p=port: connection_refused(p), 15, what=f"port {port} closed")  # type: ignore[misc]
    assert srv.http("GET", "/v1/rules", token=world.tokens["alice"]).status == 401
    assert not set(alice_rules) & set(srv.rules())
    assert edge.proc.alive()

    # grant-revoke: only the rule its grant alone covered goes (the edge one).
    edge_grant = next(
        g["grant_id"]
        for g in world.rpc("grants.list", {"user_id": "carol"})["grants"]
        if g["client_id"] == edge.client_id
    )
    status, body = srv.http("DELETE", f"/v1/grants/{edge_grant}", token=world.tokens["root"])
    assert (status, body) == (200, {"grant_id": edge_grant, "removed_rule_ids": [carol_edge_rule]})
    wait_for(lambda: connection_refused(edge_lo + 1), 15, what="carol's edge port closed")
    assert _forwarding(carol_local), "a rule still covered by a grant keeps forwarding"
    assert carol_local_rule in srv.rules()
    audit = {
        (e["actor"], e["action"], e["target"])
        for e in world.rpc("audit.list", {"limit": 200})["entries"]
    }
    assert ("root", "user.remove", "user:alice") in audit
    assert ("root", "rule.remove", f"rule:{carol_edge_rule}") in audit


def test_cannot_remove_self_or_the_last_superadmin(
    server: ServerFactory, ports: PortAllocator
) -> None:
    srv = server(shards=1)
    world = make_world(srv, ports)
    res = srv.cli("user-remove", "root", token=world.tokens["root"])
    assert res.code == 10 and "error: cannot_remove_self: " in res.err, res.err
    res = srv.cli("user-remove", "root")  # the operator token: root is the last superadmin
    assert res.code == 10 and "error: last_superadmin: " in res.err, res.err
    status, body = srv.http("DELETE", "/v1/users/root")
    assert (status, body["error"]["code"]) == (409, "last_superadmin")
    assert srv.cli("user-remove", "nobody").code == 5
