"""Revoking a client takes its rules out of ``active``: they stay listed with state
``revoked`` (also for ``list-rules --client <id>``) and ``portunus_rule_state`` says
so; deleting the client removes them (every state 0 on /metrics)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.edge.clients import ClientFactory
from tests.e2e.edge.test_edge_server import push, start_edge
from tests.e2e.support import ServerProc, echo, wait_for


def _state_gauge(srv: ServerProc, rid: int) -> dict[str, float]:
    m = srv.scrape()
    return {
        s: m.value("portunus_rule_state", rule=str(rid), state=s)
        for s in ("pending", "active", "failed", "draining", "revoked")
    }


def test_revoke_then_delete(server, clients: ClientFactory, origin, ports, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=1)
    edge = start_edge(srv, clients, tmp_path, "edge-gone")
    org = origin(echo)
    rids = [push(srv, "edge-gone", p, org.address)["id"] for p in ports.ports(2)]
    local = push(srv, "local", ports.port(), org.address)["id"]
    assert srv.cli_json("revoke", edge.client_id)["revoked_at"]
    for ref in (edge.client_id, "edge-gone"):
        listed = srv.cli_json("list-rules", "--client", ref)["rules"]
        assert sorted(r["id"] for r in listed) == rids, listed
        assert {r["state"] for r in listed} == {"revoked"}
    assert srv.rules()[local]["state"] == "active"
    wait_for(
        lambda: (
            _state_gauge(srv, rids[0])
            == {"pending": 0, "active": 0, "failed": 0, "draining": 0, "revoked": 1}
        ),
        5,
        what="portunus_rule_state revoked",
    )
    assert edge.proc.wait_exit(30) == 4
    srv.cli_json("delete-client", edge.client_id)
    assert not any(rid in srv.rules() for rid in rids)
    assert set(_state_gauge(srv, rids[0]).values()) == {0}
    gone = srv.cli("list-rules", "--client", edge.client_id)
    assert gone.code == 5, gone
