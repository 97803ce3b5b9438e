"""The real ``portunus-client`` process tree against a scripted fake gateway.

These pin down the client half on its own (enroll, forward what is pushed, keep
forwarding with the server gone and across a client restart, reconcile on
reconnect, stop for good when revoked); test_edge_server.py runs the same story
against the real ``portunus-server``.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.edge.clients import ClientFactory, enroll
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
from tests.unit.edge.fake_server import ThreadedFakeServer
from tests.unit.edge.fake_server import wire_rule as rule


def enrolled(
    gateway: ThreadedFakeServer, tmp_path: Path, cid: str = "01HEDGE01", name: str = "edge-01"
) -> Path:
    code = gateway.call_fn(lambda: gateway.server.mint(cid, name))
    out = tmp_path / f"{cid}.json"
    res = enroll(gateway.server.uri(code), out)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    return out


def push(
    gateway: ThreadedFakeServer,
    cid: str,
    upsert: list[dict[str, Any]] = (),  # type: ignore[assignment]
    remove: list[str] = (),
) -> dict[str, Any]:  # type: ignore[assignment]
    """Push and wait for the client's ack; return it."""
    seq = gateway.call(gateway.server.push(cid, list(upsert), list(remove)))
    assert seq, f"{cid} is not connected"
    return wait_for(
        lambda: next(
            (
                a
                for a in gateway.call_fn(lambda: gateway.server.frames(cid, "applied"))
                if a["seq"] == seq
            ),
            None,
        ),
        10,
        what=f"ack of seq {seq}",
    )


def test_enroll_push_forward_and_report(
    gateway: ThreadedFakeServer,
    clients: ClientFactory,
    tmp_path: Path,
    ports: PortAllocator,
    origin: Any,
) -> None:
    bundle = enrolled(gateway, tmp_path)
    client = clients(bundle, extra=["--stats-interval", "1"])
    client.wait_connected()
    hello = gateway.call_fn(lambda: gateway.server.clients["01HEDGE01"].hellos[0])
    assert hello["capabilities"] == [
        "tcp",
        "udp",
        "range",
        "sni",
        "proxy_protocol",
        "dns",
        "failover",
        "rate_limit",
        "idle_timeout",
        "quiet_link",
    ]
    o: Origin = origin(echo)
    port = ports.port()
    ack = push(gateway, "01HEDGE01", [rule("11", port, o.port)])
    assert ack["results"] == {"11": {"state": "active", "reason": None}}
    assert echo_roundtrip(port, b"x" * 1000)
    stats = wait_for(
        lambda: [
            s
            for s in gateway.call_fn(lambda: gateway.server.frames("01HEDGE01", "stats"))
            if s["rules"].get("11", {}).get("bytes_in", 0) >= 1000
        ],
        15,
        what="a stats frame counting the 1000 bytes",
    )
    assert stats[-1]["rules"]["11"]["bytes_out"] >= 1000
    assert client.scrape().value("portunus_rule_bytes_in_total", rule="11") >= 1000
    # A port already taken on the client fails that rule, with the reason, and only it.
    taken = ports.port()
    with Origin(echo, port=taken):
        ack = push(gateway, "01HEDGE01", [rule("12", taken, o.port)])
    assert ack["results"]["12"]["state"] == "failed" and ack["results"]["12"]["reason"]


def test_capability_switched_off_is_not_advertised(
    gateway: ThreadedFakeServer, clients: ClientFactory, tmp_path: Path
) -> None:
    bundle = enrolled(gateway, tmp_path)
    client = clients(bundle, extra=["--disable-capability", "sni", "--disable-capability", "udp"])
    client.wait_connected()
    hello = gateway.call_fn(lambda: gateway.server.clients["01HEDGE01"].hellos[0])
    assert hello["capabilities"] == [
        "tcp",
        "range",
        "proxy_protocol",
        "dns",
        "failover",
        "rate_limit",
        "idle_timeout",
        "quiet_link",
    ]


def test_server_gone_client_restarts_then_reconciles(
    gateway: ThreadedFakeServer,
    clients: ClientFactory,
    tmp_path: Path,
    ports: PortAllocator,
    origin: Any,
) -> None:
    bundle = enrolled(gateway, tmp_path)
    client = clients(bundle)
    client.wait_connected()
    o: Origin = origin(echo)
    keep, drop, new = ports.ports(3)
    push(gateway, "01HEDGE01", [rule("1", keep, o.port), rule("2", drop, o.port)])
    assert echo_roundtrip(keep) and echo_roundtrip(drop)

    gw_port = gateway.server.port
    gateway.call(gateway.server.stop())
    client.wait_log("link.disconnected", timeout=10)
    assert echo_roundtrip(keep) and echo_roundtrip(drop)  # forwarding goes on

    # A client restart while the server is down forwards from its cache.
    assert client.stop() == 0
    assert sorted(r["id"] for r in client.cached_rules()) == ["1", "2"]
    client = clients(bundle, data_dir=client.data_dir, name="restarted")
    wait_for(
        lambda: echo_roundtrip(keep) and echo_roundtrip(drop), 10, what="cached rules forwarding"
    )
    held = connect(keep)  # must survive the reconnect: rule 1 does not change
    held.sendall(b"before")
    assert recv_exact(held, 6) == b"before"

    # Meanwhile on the server: rule 2 removed, rule 3 added.
    def edit() -> None:
        rules = gateway.server.clients["01HEDGE01"].rules
        rules.pop("2")
        rules["3"] = rule("3", new, o.port)

    gateway.call_fn(edit)
    mark = client.log_mark()
    gateway.call(gateway.server.start(gw_port))
    client.wait_connected(since=mark, timeout=40)
    wait_for(lambda: connection_refused(drop), 10, what=f"rule 2 (port {drop}) drained")
    wait_for(lambda: echo_roundtrip(new), 10, what="rule 3 forwarding")
    held.sendall(b"after")
    assert recv_exact(held, 5) == b"after"
    held.close()
    assert sorted(r["id"] for r in client.cached_rules()) == ["1", "3"]


def test_revoked_client_exits_and_stays_down(
    gateway: ThreadedFakeServer, clients: ClientFactory, tmp_path: Path
) -> None:
    bundle = enrolled(gateway, tmp_path)
    client = clients(bundle)
    client.wait_connected()
    gateway.call(gateway.server.revoke("01HEDGE01"))
    code = client.wait_exit(30)
    assert code == 4, client.stderr_tail()
    text = client.stderr_text()
    assert "revoked" in text and "portunus-client enroll" in text
    # The supervisor's own halt line says why too, not "configuration or schema problem".
    assert "configuration or schema" not in text and "revoked this client" in text, text
    # Every exit code the log states is the one the process exits with.
    stated = {rec["exit_code"] for rec in client.logs() if "exit_code" in rec}
    assert stated == {4}, stated
    halt = client.wait_log("supervisor.halt")
    assert halt["child"] == "link" and halt["exit_code"] == 4
    assert client.cached_rules() == []
    again = clients(bundle, name="after-revoke", ready=False, data_dir=client.data_dir)
    assert again.wait_exit(10) == 4
    assert "revoked" in again.stderr_text()


def test_sigterm_is_a_clean_exit(
    gateway: ThreadedFakeServer, clients: ClientFactory, tmp_path: Path
) -> None:
    client = clients(enrolled(gateway, tmp_path))
    client.wait_connected()
    assert client.stop(signal.SIGTERM, timeout=30) == 0
    assert not os.path.exists(client.data_dir / "revoked.json")


def test_tampered_fingerprint_is_refused(gateway: ThreadedFakeServer, tmp_path: Path) -> None:
    code = gateway.call_fn(lambda: gateway.server.mint("01HEDGE01", "edge-01"))
    bad = "sha256:" + "00" * 32
    res = enroll(gateway.server.uri(code, bad), tmp_path / "b.json")
    assert res.returncode == 1
    assert bad in res.stderr and gateway.server.fingerprint in res.stderr
    assert not (tmp_path / "b.json").exists()
    assert gateway.call_fn(lambda: list(gateway.server.enroll_frames)) == []


@pytest.mark.parametrize("why", ["used", "expired"])
def test_used_or_expired_code_is_refused(
    gateway: ThreadedFakeServer, tmp_path: Path, why: str
) -> None:
    ttl = -1.0 if why == "expired" else 600.0
    code = gateway.call_fn(lambda: gateway.server.mint("01HEDGE01", "edge-01", ttl))
    if why == "used":
        assert enroll(gateway.server.uri(code), tmp_path / "first.json").returncode == 0
    res = enroll(gateway.server.uri(code), tmp_path / "b.json")
    assert res.returncode == 1 and "enrollment_invalid" in res.stderr
    assert ("already used" if why == "used" else "expired") in res.stderr


def test_busy_metrics_port_fails_the_start(
    gateway: ThreadedFakeServer, clients: ClientFactory, tmp_path: Path
) -> None:
    """The client binds /metrics before it forks: a taken --metrics-listen ends the
    start with 73 and the flag to change, instead of a metrics child respawned forever."""
    bundle = enrolled(gateway, tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        client = clients(bundle, ready=False, extra=["--metrics-listen", f"127.0.0.1:{taken}"])
        code = client.wait_exit(15)
    assert code == 73, client.stderr_tail()
    line = next(
        ln for ln in client.stderr_text().splitlines() if ln.startswith("error: listen_failed:")
    )
    assert f"127.0.0.1:{taken}" in line and "--metrics-listen" in line, line
    assert client.events("supervisor.ready") == []
