"""The audit trail: every mutation — accepted or refused, from the CLI or the API,
by the operator token or a minted user — leaves a row with actor, action, target,
outcome and error code, readable with ``portunus-server audit`` and ``GET
/v1/audit`` (time range, cursor pagination, newest first)."""

from __future__ import annotations

import json
import socket
from collections import Counter
from typing import Any

import pytest

from portunus.errors import PortunusError
from tests.e2e.support import LOOPBACK, ServerProc, connection_refused, echo, wait_for

ENTRY_KEYS = {"id", "ts", "actor", "action", "target", "outcome", "error_code"}


def _row(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e["actor"], e["action"], e["target"], e["outcome"], e["error_code"])


def _all_entries(srv: ServerProc) -> list[dict[str, Any]]:
    out = srv.cli_json("audit", "--limit", "1000")
    assert out["next_cursor"] is None
    return out["entries"]


def test_every_mutation_is_audited(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=1)
    org = origin(echo)
    start_ids = {e["id"] for e in _all_entries(srv)}
    ops_token = srv.cli("bootstrap-superadmin", "--name", "ops").stdout.strip()
    p1, p2, p3, p4 = ports.ports(4)

    r1 = srv.cli_json("push-rule", "local", str(p1), org.address)["id"]  # operator, CLI
    r2 = srv.http(
        "POST",
        "/v1/rules",
        {"listen_port": p2, "targets": [{"host": LOOPBACK, "port": org.port}]},
        token=ops_token,
    ).json()["id"]  # ops, HTTP
    dup = srv.cli("push-rule", "local", str(p1), org.address)  # conflict
    assert dup.returncode == 10
    # Refused by validation in the control process (the RPC path; an HTTP body the web
    # process's schema check refuses never reaches control and is not audited).
    with pytest.raises(PortunusError) as bad:
        srv.rpc("rules.push", {"listen_port": 0, "targets": [{"host": LOOPBACK, "port": 9}]})
    assert bad.value.code.startswith("validation.")
    with socket.socket() as foreign:  # activation fails
        foreign.bind((LOOPBACK, p3))
        foreign.listen()
        failed = srv.cli("push-rule", "local", str(p3), org.address, "--format", "json")
        assert failed.returncode == 6
    r3 = json.loads(failed.stdout)["id"]
    upd = srv.http(
        "PUT", f"/v1/rules/{r1}", {"rate_limit": {"concurrent_connections": 5}}, token=ops_token
    )
    assert upd.status == 200, upd
    assert srv.cli("remove-rule", str(r2)).returncode == 0  # drains, then removed
    assert srv.http("DELETE", f"/v1/rules/{r3}").status == 204  # failed: removed at once
    missing = srv.cli("remove-rule", "999999")
    assert missing.returncode == 5
    # Refused for want of a token: nobody to attribute it to, and nothing changed.
    assert (
        srv.http(
            "POST",
            "/v1/rules",
            {"listen_port": p4, "targets": [{"host": LOOPBACK, "port": 9}]},
            token=None,
        ).status
        == 401
    )
    wait_for(
        lambda: connection_refused(p2) and r2 not in srv.rules(),
        5,
        what="rule r2 drained and deleted",
    )

    def new_entries() -> list[dict[str, Any]]:
        return [e for e in _all_entries(srv) if e["id"] not in start_ids]

    expected = [
        ("cli:bootstrap-superadmin", "user.bootstrap", "user:ops", "ok", None),
        ("operator", "rule.push", f"rule:{r1}", "ok", None),
        ("ops", "rule.push", f"rule:{r2}", "ok", None),
        ("operator", "rule.push", "client:local", "error", "port_conflict"),
        ("operator", "rule.push", f"rule:{r3}", "ok", None),
        ("system", "rule.state", f"rule:{r1}", "ok", None),
        ("system", "rule.state", f"rule:{r2}", "ok", None),
        ("system", "rule.state", f"rule:{r3}", "error", "activation_failed"),
        ("ops", "rule.update", f"rule:{r1}", "ok", None),
        ("operator", "rule.remove", f"rule:{r2}", "ok", None),
        ("system", "rule.removed", f"rule:{r2}", "ok", None),
        ("operator", "rule.remove", f"rule:{r3}", "ok", None),
        ("operator", "rule.remove", "rule:999999", "error", "rule_not_found"),
    ]
    wait_for(
        lambda: all(x in {_row(e) for e in new_entries()} for x in expected),
        5,
        what=lambda: "audit rows " + str(sorted(set(expected) - {_row(e) for e in new_entries()})),
    )
    entries = new_entries()
    rows = [_row(e) for e in entries]
    # The refused validation: one error row with a validation.* code.
    validation = [r for r in rows if r[1] == "rule.push" and (r[4] or "").startswith("validation.")]
    assert (
        len(validation) == 1 and validation[0][0] == "operator" and validation[0][3] == "error"
    ), "\n".join(map(str, rows))
    # Nothing twice, nothing for the unauthenticated request, nothing else unexpected.
    counts = Counter(rows)
    assert all(counts[x] == 1 for x in expected), counts
    extra = [r for r in rows if r not in expected and r not in validation]
    assert extra == [], f"unexpected audit rows: {extra}"
    assert not any(str(p4) in json.dumps(e) for e in entries), (
        "an unauthenticated request was audited"
    )
    for e in entries:
        assert ENTRY_KEYS <= set(e), e
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids, reverse=True), "newest first"
    assert [e["ts"] for e in entries] == sorted((e["ts"] for e in entries), reverse=True)

    # HTTP shows the same rows.
    http_entries = srv.http("GET", "/v1/audit?limit=1000").json()["entries"]
    assert [e["id"] for e in http_entries if e["id"] not in start_ids] == ids


def test_audit_pagination_and_time_range(server, ports) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=1)
    for _ in range(5):
        rid = srv.rpc(
            "rules.push", {"listen_port": ports.port(), "targets": [{"host": LOOPBACK, "port": 9}]}
        )["id"]
        srv.rpc("rules.remove", {"id": rid})
    everything = srv.http("GET", "/v1/audit?limit=1000").json()["entries"]
    assert len(everything) >= 15

    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(len(everything)):
        q = "/v1/audit?limit=4" + (f"&cursor={cursor}" if cursor else "")
        page = srv.http("GET", q).json()
        assert len(page["entries"]) <= 4
        pages += page["entries"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [e["id"] for e in pages] == [e["id"] for e in everything], "pages skip or repeat rows"

    recent = srv.cli_json("audit", "--since", "1h", "--limit", "1000")["entries"]
    assert [e["id"] for e in recent] == [e["id"] for e in everything]
    assert srv.cli_json("audit", "--since", "2999-01-01T00:00:00Z")["entries"] == []
    assert srv.cli_json("audit", "--until", "2000-01-01T00:00:00Z")["entries"] == []
    # until is exclusive of the present: an entry's own ts as until leaves it out.
    newest = everything[0]
    upto = srv.http("GET", f"/v1/audit?limit=1000&until={newest['ts']}").json()["entries"]
    assert newest["id"] not in [e["id"] for e in upto]
    text = srv.cli("audit", "--limit", "3")
    assert text.returncode == 0
    header = text.stdout.splitlines()[0].split()
    assert "ACTION" in header and "ACTOR" in header, text.stdout
    assert "(more entries" in text.stderr
