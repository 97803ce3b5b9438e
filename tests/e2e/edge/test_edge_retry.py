"""An edge client retries a failed rule by itself and tells the server, unasked:
the rule's row turns active once the port on the edge frees."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.e2e.edge.clients import ClientFactory
from tests.e2e.edge.test_edge_server import start_edge
from tests.e2e.support import LOOPBACK, ServerProc, echo, echo_roundtrip, wait_for


def test_edge_rule_turns_active_when_its_port_frees(
    server, clients: ClientFactory, origin, ports, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=1)
    edge = start_edge(srv, clients, tmp_path, "edge-retry")
    org = origin(echo)
    port = ports.port()
    squatter = socket.socket()
    squatter.bind((LOOPBACK, port))
    squatter.listen()
    res = srv.cli("push-rule", "edge-retry", str(port), org.address, "--format", "json")
    assert res.code == 6, res
    rid = res.json["id"]
    squatter.close()
    wait_for(
        lambda: srv.rules()[rid]["state"] == "active",
        15,
        what=lambda: f"the edge rule active on the server: {srv.rules()[rid]}",
    )
    assert echo_roundtrip(port)
    assert edge.proc.events("rule.retry_succeeded", rule=str(rid))
