"""Rules pushed at run time to ``portunus-server serve``, through the CLI and the
/v1 API: traffic flows as soon as the push returns, list/stats/remove answer in
the contract's shapes (text tables and JSON), byte counters match what moved in
each direction, a port held by a foreign socket fails the rule (kept, listed as
failed, removable) and a second rule on a taken port is a conflict."""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any

import pytest

from tests.e2e.support import (
    REQUEST,
    Pattern,
    ServerFactory,
    ServerProc,
    client_duplex,
    connect,
    connection_refused,
    duplex_on_request,
    echo,
    echo_roundtrip,
    wait_for,
)

RULE_KEYS = {
    "id",
    "client",
    "client_id",
    "protocol",
    "listen_port",
    "targets",
    "sni_pattern",
    "proxy_protocol",
    "prefer_ipv6",
    "health_check_interval_secs",
    "rate_limit",
    "owner",
    "state",
    "failure_reason",
    "created_at",
    "idle_timeout_secs",
}
STATS_KEYS = {"id", "bytes_in", "bytes_out", "connections_total", "active_connections"}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture(scope="module")
def srv(server_module: ServerFactory) -> ServerProc:
    """One server with two shards for the whole module; each test uses its own ports."""
    return server_module(shards=2)


def check_rule_shape(
    rule: dict[str, Any], *, port: int, target: tuple[str, int], state: str
) -> None:
    assert set(rule) == RULE_KEYS, f"rule keys differ: {sorted(set(rule) ^ RULE_KEYS)}"
    assert isinstance(rule["id"], int) and rule["id"] > 0
    assert rule["client"] == "local" and rule["client_id"] == "local"
    assert rule["protocol"] == "tcp"
    assert rule["listen_port"] == port
    assert rule["targets"] == [{"host": target[0], "port": target[1], "priority": 1}]
    assert rule["state"] == state
    assert RFC3339_UTC.match(rule["created_at"]), rule["created_at"]


def http_body(port: int, target_port: int, **extra: Any) -> dict[str, Any]:
    return {
        "client": "local",
        "listen_port": port,
        "targets": [{"host": "127.0.0.1", "port": target_port}],
        **extra,
    }


# ------------------------------------------------------------------ push


def test_push_via_cli_then_bytes_flow_within_a_second(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    assert connection_refused(port)
    t0 = time.monotonic()
    res = srv.cli("push-rule", "local", str(port), org.address)
    # No retry: once push-rule returns, the rule must already forward.
    assert echo_roundtrip(port, b"via cli\n")
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    m = re.fullmatch(
        rf"rule (\d+) active: local tcp {port} -> 127\.0\.0\.1:{org.port}\n", res.stdout
    )
    assert m, f"push-rule printed {res.stdout!r}"
    assert elapsed < 1.0, f"push via CLI to first echoed byte took {elapsed:.3f}s"
    rule_id = int(m.group(1))
    assert srv.rules()[rule_id]["state"] == "active"
    srv.rpc("rules.remove", {"id": rule_id})


def test_push_via_http_then_bytes_flow_within_a_second(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    t0 = time.monotonic()
    resp = srv.http("POST", "/v1/rules", http_body(port, org.port))
    assert echo_roundtrip(port, b"via http\n")
    elapsed = time.monotonic() - t0
    assert resp.status == 201, resp
    rule = resp.json()
    check_rule_shape(rule, port=port, target=("127.0.0.1", org.port), state="active")
    assert resp.headers.get("location") == f"/v1/rules/{rule['id']}"
    assert elapsed < 1.0, f"push via HTTP to first echoed byte took {elapsed:.3f}s"
    assert srv.http("DELETE", f"/v1/rules/{rule['id']}").status == 204


def test_push_json_output_is_the_rule(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    rule = srv.cli_json("push-rule", "local", str(port), org.address)
    check_rule_shape(rule, port=port, target=("127.0.0.1", org.port), state="active")
    assert srv.cli_json("remove-rule", str(rule["id"])) == {}


# ------------------------------------------------------------------ list, stats, remove


def test_list_stats_remove_text_and_json(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    rule = srv.cli_json("push-rule", "local", str(port), org.address)
    rid = rule["id"]

    listed = srv.cli_json("list-rules")
    # the contract's {"rules": [...]} plus the page's next_cursor and total (README reference)
    assert set(listed) == {"rules", "next_cursor", "total"}
    assert listed["next_cursor"] is None and listed["total"] == len(listed["rules"])
    mine = [r for r in listed["rules"] if r["id"] == rid]
    assert len(mine) == 1
    check_rule_shape(mine[0], port=port, target=("127.0.0.1", org.port), state="active")
    ids = [r["id"] for r in listed["rules"]]
    assert ids == sorted(ids), "list-rules must be ordered by id"
    assert srv.http("GET", "/v1/rules").json() == listed, "CLI json and HTTP list differ"
    assert srv.http("GET", f"/v1/rules/{rid}").json() == mine[0]

    text = srv.cli("list-rules")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    header = lines[0]
    assert header.split() == ["ID", "CLIENT", "PROTO", "LISTEN", "TARGETS", "STATE", "INFO"]
    row = next(ln for ln in lines[1:] if ln.split()[0] == str(rid))
    assert row.split()[:6] == [str(rid), "local", "tcp", str(port), org.address, "active"]
    # Aligned: each cell starts under its header.
    for col, cell in (("LISTEN", str(port)), ("TARGETS", org.address), ("STATE", "active")):
        assert row.index(cell) == header.index(col), f"{col} column not aligned:\n{text.stdout}"

    stats = srv.cli_json("rule-stats", str(rid))
    assert set(stats) == STATS_KEYS
    assert stats == {
        "id": rid,
        "bytes_in": 0,
        "bytes_out": 0,
        "connections_total": 0,
        "active_connections": 0,
    }
    stats_text = srv.cli("rule-stats", str(rid))
    assert stats_text.returncode == 0
    assert re.search(r"^\s+bytes in\s+0 B$", stats_text.stdout, re.M), stats_text.stdout
    assert re.search(r"^\s+connections total\s+0$", stats_text.stdout, re.M), stats_text.stdout

    res = srv.cli("remove-rule", str(rid))
    assert res.returncode == 0, res.stderr
    assert str(rid) in res.stdout and "removed" in res.stdout
    wait_for(lambda: connection_refused(port), 5, what=f"port {port} freed after remove")
    wait_for(lambda: rid not in srv.rules(), 5, what=f"rule {rid} gone from list-rules")
    gone = srv.http("GET", f"/v1/rules/{rid}")
    assert gone.status == 404 and gone.error_code == "rule_not_found", gone
    again = srv.cli("remove-rule", str(rid))
    assert again.returncode == 5 and "rule_not_found" in again.stderr, (
        again.returncode,
        again.stderr,
    )
    stats_gone = srv.cli("rule-stats", str(rid))
    assert stats_gone.returncode == 5, stats_gone.stderr


def test_stats_count_the_bytes_sent_each_way(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    """Several connections (spread over both shards) with odd sizes that are not
    multiples of the 64 KiB flush step; in = client→target, out = target→client."""
    sizes = [(300_001, 123_457), (1, 70_000), (65_537, 3), (200_000, 500_009)]
    org = origin(duplex_on_request)
    port = ports.port()
    rid = srv.cli_json("push-rule", "local", str(port), org.address)["id"]
    for i, (n_in, n_out) in enumerate(sizes):
        sent, got = client_duplex(
            port, Pattern(n_in, seed=i), Pattern(n_out, seed=100 + i), token=i
        )
        assert (sent.count, got.count) == (n_in, n_out)
    org.wait_connections(len(sizes))
    for rec in org.records:
        assert rec.done.wait(5)

    # The REQUEST header is client→target payload too.
    want_in = sum(a for a, _ in sizes) + REQUEST.size * len(sizes)
    want_out = sum(b for _, b in sizes)
    want = {
        "id": rid,
        "bytes_in": want_in,
        "bytes_out": want_out,
        "connections_total": len(sizes),
        "active_connections": 0,
    }
    wait_for(
        lambda: srv.rpc("rules.stats", {"id": rid}) == want,
        5,
        what=lambda: f"stats {want}, last {srv.rpc('rules.stats', {'id': rid})}",
    )
    assert srv.cli_json("rule-stats", str(rid)) == want
    http_stats = srv.http("GET", f"/v1/rules/{rid}/stats")
    assert http_stats.status == 200 and http_stats.json() == want, http_stats
    text = srv.cli("rule-stats", str(rid)).stdout
    assert re.search(rf"^\s+bytes in\s+.*\({want_in}\)$", text, re.M), text
    assert re.search(rf"^\s+bytes out\s+.*\({want_out}\)$", text, re.M), text
    srv.rpc("rules.remove", {"id": rid})


def test_active_connections_counted_while_open(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    rid = srv.cli_json("push-rule", "local", str(port), org.address)["id"]
    socks = [connect(port) for _ in range(3)]
    try:
        for s in socks:
            s.sendall(b"hi")
            assert s.recv(2) == b"hi"
        wait_for(
            lambda: srv.rpc("rules.stats", {"id": rid})["active_connections"] == 3,
            5,
            what="3 active connections",
        )
    finally:
        for s in socks:
            s.close()
    wait_for(
        lambda: srv.rpc("rules.stats", {"id": rid})["active_connections"] == 0,
        5,
        what="0 active connections after close",
    )
    assert srv.rpc("rules.stats", {"id": rid})["connections_total"] == 3
    srv.rpc("rules.remove", {"id": rid})


# ------------------------------------------------------------------ failures


def _foreign_listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_port_bound_by_foreign_socket_via_cli(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    foreign = _foreign_listener(port)
    try:
        res = srv.cli("push-rule", "local", str(port), org.address, "--format", "json")
        assert res.returncode == 6, (res.returncode, res.stderr)
        assert res.stderr.startswith("error: activation_failed: "), res.stderr
        assert f"port {port}" in res.stderr.splitlines()[0], res.stderr
        assert "hint:" in res.stderr
        rule = json.loads(res.stdout)
        assert rule["state"] == "failed" and str(port) in rule["failure_reason"]
        rid = rule["id"]
        listed = srv.rules()[rid]
        assert listed["state"] == "failed"
        assert f"port {port}" in listed["failure_reason"], listed
        assert "failed" in srv.cli("list-rules").stdout

        # A failed rule keeps its slot until removed.
        dup = srv.cli("push-rule", "local", str(port), org.address)
        assert dup.returncode == 10 and "port_conflict" in dup.stderr, (dup.returncode, dup.stderr)

        rm = srv.cli("remove-rule", str(rid))
        assert rm.returncode == 0, rm.stderr
        assert rid not in srv.rules(), "a failed rule is deleted at once on remove"
    finally:
        foreign.close()
    # The foreign socket is gone: the same push now succeeds.
    rule = srv.cli_json("push-rule", "local", str(port), org.address)
    assert rule["state"] == "active"
    assert echo_roundtrip(port)
    srv.rpc("rules.remove", {"id": rule["id"]})


def test_port_bound_by_foreign_socket_via_http(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    with _foreign_listener(port):
        resp = srv.http("POST", "/v1/rules", http_body(port, org.port))
        assert resp.status == 422, resp
        err = resp.json()["error"]
        assert err["code"] == "activation_failed"
        assert f"port {port}" in err["message"], err
        rid = err["rule"]["id"]
        assert err["rule"]["state"] == "failed"
        shown = srv.http("GET", f"/v1/rules/{rid}").json()
        assert shown["state"] == "failed" and f"port {port}" in shown["failure_reason"]
        assert srv.http("DELETE", f"/v1/rules/{rid}").status == 204
        assert srv.http("GET", f"/v1/rules/{rid}").status == 404


def test_duplicate_port_is_a_conflict(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    rid = srv.cli_json("push-rule", "local", str(port), org.address)["id"]
    before = srv.rules()

    cli = srv.cli("push-rule", "local", str(port), "127.0.0.1:9")
    assert cli.returncode == 10, (cli.returncode, cli.stderr)
    assert cli.stderr.startswith("error: port_conflict: "), cli.stderr
    resp = srv.http("POST", "/v1/rules", http_body(port, 9))
    assert resp.status == 409 and resp.error_code == "port_conflict", resp
    assert srv.rules() == before, "a refused push must store nothing"
    assert echo_roundtrip(port), "the existing rule must keep forwarding"

    # Same port, other protocol: a different slot.
    udp = srv.http("POST", "/v1/rules", http_body(port, org.port, protocol="udp"))
    assert udp.status == 201, udp
    srv.rpc("rules.remove", {"id": udp.json()["id"]})
    srv.rpc("rules.remove", {"id": rid})
