"""Targets changed in place (``update-rule ID --target ...``, ``PUT /v1/rules/{id}``
with ``targets``): the same rule id, a listener that never closes (a connect loop
through the change sees no refusal), open connections keep their target and new
ones reach the new one."""

from __future__ import annotations

import socket
import threading

from tests.e2e.support import ServerProc, connect, echo, recv_exact, wait_for
from tests.e2e.support.origins import ConnRecord


def tagged(tag: bytes):  # type: ignore[no-untyped-def]
    """Say ``tag`` first, then echo: which target a connection reached."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        conn.sendall(tag)
        echo(conn, rec)

    return handler


def _first(port: int) -> bytes:
    with connect(port) as s:
        return recv_exact(s, 1)


def test_update_targets_in_place(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=2)
    a, b = origin(tagged(b"A")), origin(tagged(b"B"))
    port = ports.port()
    rule = srv.cli_json("push-rule", "local", str(port), a.address)
    held = connect(port)
    assert recv_exact(held, 1) == b"A"
    refused: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                _first(port)
            except OSError as exc:
                refused.append(repr(exc))

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        updated = srv.cli_json("update-rule", str(rule["id"]), "--target", f"{b.address}@1")
        wait_for(lambda: _first(port) == b"B", 10, what="a new connection reaching the new target")
    finally:
        stop.set()
        t.join(10)
    assert refused == [], refused[:3]
    assert updated["id"] == rule["id"] and updated["state"] == "active"
    assert [(x["host"], x["port"]) for x in updated["targets"]] == [("127.0.0.1", b.port)]
    held.sendall(b"still A\n")  # the open connection kept its target
    assert recv_exact(held, 8) == b"still A\n"
    held.close()

    resp = srv.http(
        "PUT", f"/v1/rules/{rule['id']}", {"targets": [{"host": "127.0.0.1", "port": a.port}]}
    )
    assert resp.status == 200, resp
    wait_for(lambda: _first(port) == b"A", 10, what="back on A after PUT")
    bad = srv.http("PUT", f"/v1/rules/{rule['id']}", {"targets": [], "listen_port": 1})
    assert bad.status == 400 and bad.error_code in (
        "validation.immutable_field",
        "validation.targets",
    ), bad
    res = srv.cli("update-rule", str(rule["id"]), "--target", "127.0.0.1:1-5")
    assert res.code == 2, res  # a range target on a single-port rule
    audit = srv.cli_json("audit", "--limit", "50")
    entries = audit["entries"] if isinstance(audit, dict) else audit
    changes = [e for e in entries if e.get("action") == "rule.update" and e.get("outcome") == "ok"]
    assert len(changes) == 2 and any("targets" in (e.get("details") or {}) for e in changes), (
        changes
    )
