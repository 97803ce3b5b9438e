"""A failed rule (its port taken) is retried with backoff and becomes active once
the port frees, with no operator action; ``retry-rule ID`` tries at once (exit 6
while the port is still taken). Standalone retries the same way, without SIGHUP."""

from __future__ import annotations

import json
import socket
import time

from tests.e2e.support import LOOPBACK, ServerProc, echo, echo_roundtrip, wait_for


def _squat(port: int) -> socket.socket:
    s = socket.socket()
    s.bind((LOOPBACK, port))
    s.listen()
    return s


def test_failed_rule_becomes_active_when_its_port_frees(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=2)
    org = origin(echo)
    port = ports.port()
    squatter = _squat(port)
    res = srv.cli("push-rule", "local", str(port), org.address, "--format", "json")
    assert res.code == 6, res
    rule = json.loads(res.out)
    assert rule["state"] == "failed" and "port_in_use" in rule["failure_reason"]
    time.sleep(1.5)  # a retry or two fail while the port is still taken
    assert srv.rules()[rule["id"]]["state"] == "failed"
    squatter.close()
    freed = time.monotonic()
    wait_for(
        lambda: srv.rules()[rule["id"]]["state"] == "active",
        15,
        what=lambda: f"the rule active after its port freed: {srv.rules()[rule['id']]}",
    )
    print(f"active {time.monotonic() - freed:.2f}s after the port freed")
    assert srv.rules()[rule["id"]]["failure_reason"] is None
    assert echo_roundtrip(port)
    assert srv.events("rule.retry_succeeded", rule=str(rule["id"]))


def test_retry_rule_verb(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=1)
    org = origin(echo)
    port = ports.port()
    squatter = _squat(port)
    try:
        rid = json.loads(
            srv.cli("push-rule", "local", str(port), org.address, "--format", "json").out
        )["id"]
        still = srv.cli("retry-rule", str(rid), "--format", "json")
        assert still.code == 6, still
        assert json.loads(still.out)["state"] == "failed"
        assert still.err.startswith("error: activation_failed: port_in_use"), still.err
    finally:
        squatter.close()
    ok = srv.cli("retry-rule", str(rid), "--format", "json")
    assert ok.code == 0, ok
    assert json.loads(ok.out)["state"] == "active"
    assert echo_roundtrip(port)
    missing = srv.cli("retry-rule", "999999")
    assert missing.code == 5, missing
    audit = srv.cli_json("audit", "--limit", "20")
    entries = audit["entries"] if isinstance(audit, dict) else audit
    assert any(e.get("action") == "rule.retry" for e in entries), entries


def test_retry_over_http(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    """POST /v1/rules/{id}/retry answers like the verb: 422 activation_failed with the
    still-failed rule while the port is taken, the active rule once it is freed (and
    bytes flow), 404 rule_not_found for an unknown id."""
    srv: ServerProc = server(shards=1)
    org = origin(echo)
    port = ports.port()
    squatter = _squat(port)
    try:
        pushed = srv.http(
            "POST",
            "/v1/rules",
            {
                "client": "local",
                "listen_port": port,
                "targets": [{"host": LOOPBACK, "port": org.port}],
            },
        )
        assert (pushed.status, pushed.error_code) == (422, "activation_failed"), pushed
        rid = pushed.json()["error"]["rule"]["id"]
        still = srv.http("POST", f"/v1/rules/{rid}/retry")
        assert (still.status, still.error_code) == (422, "activation_failed"), still
        err = still.json()["error"]
        assert err["rule"]["id"] == rid and err["rule"]["state"] == "failed", err
        assert "port_in_use" in err["message"], err
    finally:
        squatter.close()
    ok = srv.http("POST", f"/v1/rules/{rid}/retry")
    assert ok.status == 200, ok
    assert (ok.json()["id"], ok.json()["state"]) == (rid, "active"), ok.json()
    assert echo_roundtrip(port)
    missing = srv.http("POST", "/v1/rules/999999/retry")
    assert (missing.status, missing.error_code) == (404, "rule_not_found"), missing


def test_standalone_retries_a_failed_rule(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    squatter = _squat(port)
    proc = standalone([{"name": "late", "listen_port": port, "target": org.address}], ready=False)
    proc.wait_log("supervisor.ready")
    failed = proc.wait_log("rule.failed")
    assert failed["rule"] == "late"
    squatter.close()
    proc.wait_log("rule.retry_succeeded", timeout=15)
    assert echo_roundtrip(port)
