"""The storage verbs and schema upgrades against a real ``portunus-server serve``:
a backup taken while the server runs (and while rules are being pushed) is
consistent; restore and reset refuse under a live server; stop -> reset ->
restore -> start brings the rule back, active and forwarding; a version-1
database migrates on start with its rules intact; a newer schema stops serve
with exit 78."""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import threading
from pathlib import Path
from typing import Any

from portunus.control.store.migrations import LATEST, connect_sync, migrate, utc_now
from tests.e2e.support import ServerProc, connection_refused, echo, echo_roundtrip, wait_for

ME = "os:" + pwd.getpwuid(os.geteuid()).pw_name


def _audit(srv: ServerProc, action: str) -> list[dict[str, Any]]:
    entries = srv.cli_json("audit", "--limit", "1000")["entries"]
    return [e for e in entries if e["action"] == action]


def _query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _json(res: Any) -> Any:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    return json.loads(res.stdout)


def test_backup_running_then_reset_and_restore_bring_the_rule_back(
    server,
    origin,
    ports,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    srv = server()
    org = origin(echo)
    port = ports.port()
    rule = srv.cli_json("push-rule", "local", str(port), org.address)
    assert echo_roundtrip(port, b"before\n")

    out = tmp_path / "portunus.db"
    doc = _json(srv.cli("backup", "--out", str(out), "--format", "json"))
    assert doc["out"] == str(out) and doc["schema_version"] == LATEST and doc["audited"] is True
    assert [r[0] for r in _query(out, "SELECT id FROM rules")] == [rule["id"]]
    (entry,) = _audit(srv, "storage.backup")
    assert entry["actor"] == ME and entry["target"] == f"file:{out}" and entry["outcome"] == "ok"

    # Under the live server: refused, by the socket and — with a socket that answers
    # nothing — by the lock the control process holds on state.db.
    for extra in ((), ("--socket", str(tmp_path / "nobody.sock"))):
        for args in (("restore", "--in", str(out), "--force"), ("reset", "--confirm")):
            res = srv.cli(*extra, *args)
            assert res.returncode == 10, (args, res.stdout, res.stderr)
            assert res.stderr.startswith(
                "error: conflict.server_running: the server is running ("
            ), res.stderr
            assert "systemctl stop portunus" in res.stderr
            why = "another process has" if extra else "its control socket"
            assert why in res.stderr, res.stderr
    assert echo_roundtrip(port, b"still serving\n")
    assert srv.rules()[rule["id"]]["state"] == "active"

    assert srv.stop() == 0
    res = srv.cli("reset", "--confirm")
    assert res.returncode == 0, res.stderr
    (aside,) = srv.data_dir.glob("state.db.bak-*")
    assert str(aside) in res.stdout
    assert not srv.db_path.exists()

    srv.start()
    srv.wait_ready()
    assert srv.rules() == {}
    assert connection_refused(port)
    assert srv.stop() == 0

    # The database that start created holds nothing worth a --force.
    doc = _json(srv.cli("restore", "--in", str(out), "--format", "json"))
    assert doc["rules"] == 1 and doc["schema_version"] == LATEST and doc["previous"]
    srv.start()
    srv.wait_ready()
    wait_for(
        lambda: srv.rules().get(rule["id"], {}).get("state") == "active",
        10,
        what=lambda: f"rule {rule['id']} active again, have {srv.rules()}",
    )
    assert echo_roundtrip(port, b"after restore\n")
    (entry,) = _audit(srv, "storage.restore")
    assert entry["actor"] == ME and entry["target"] == f"file:{out}"
    assert entry["details"]["previous"] == doc["previous"]


def test_backups_while_rules_are_pushed_are_consistent(
    server, origin, ports, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Each backup is one transaction's view: every rule in it has its target row,
    and successive backups see the rule count only grow while pushes go on."""
    srv = server()
    org = origin(echo)
    listen = ports.ports(300)
    stop = threading.Event()
    pushed: list[int] = []
    errors: list[BaseException] = []

    def pusher() -> None:
        try:
            for p in listen:
                if stop.is_set():
                    return
                srv.rpc(
                    "rules.push",
                    {
                        "client": "local",
                        "listen_port": p,
                        "targets": [{"host": "127.0.0.1", "port": org.port}],
                    },
                )
                pushed.append(p)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=pusher)
    thread.start()
    counts = []
    try:
        wait_for(lambda: pushed, 10, what="a first push")
        for i in range(6):
            out = tmp_path / f"b{i}.db"
            res = srv.cli("backup", "--out", str(out))
            assert res.returncode == 0, res.stderr
            assert _query(out, "PRAGMA integrity_check") == [("ok",)]
            orphans = _query(
                out,
                "SELECT count(*) FROM rules r WHERE NOT EXISTS "
                "(SELECT 1 FROM rule_targets t WHERE t.rule_id = r.id)",
            )
            assert orphans == [(0,)]
            counts.append(_query(out, "SELECT count(*) FROM rules")[0][0])
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    assert counts == sorted(counts)
    assert len(set(counts)) > 1, f"the pushes did not overlap the backups: {counts}"
    final = tmp_path / "final.db"
    assert srv.cli("backup", "--out", str(final)).returncode == 0
    assert _query(final, "SELECT count(*) FROM rules") == [(len(pushed),)]


def _v1_database(path: Path, port: int, target_port: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect_sync(str(path))
    try:
        assert migrate(conn, str(path), target=1) == 1
        rid = conn.execute(
            "INSERT INTO rules (client_id, protocol, listen_start, listen_end, state, created_at) "
            "VALUES ('local', 'tcp', ?, ?, 'active', ?)",
            (port, port, utc_now()),
        ).lastrowid
        conn.execute(
            "INSERT INTO rule_targets (rule_id, position, host, port, priority) "
            "VALUES (?, 0, '127.0.0.1', ?, 1)",
            (rid, target_port),
        )
    finally:
        conn.close()
    os.chmod(path, 0o600)  # as every Portunus since v1 leaves it (serve refuses a wider mode)


def test_version_1_database_migrates_on_start(server, origin, ports, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert LATEST > 1, "only one migration: nothing to upgrade from"
    org = origin(echo)
    port = ports.port()
    data = tmp_path / "old"
    _v1_database(data / "state.db", port, org.port)
    srv = server(data_dir=data)
    wait_for(lambda: echo_roundtrip(port, b"from v1\n"), 10, what="the v1 rule forwarding")
    (rule,) = srv.rules().values()
    assert rule["listen_port"] == port and rule["state"] == "active"
    assert srv.stop() == 0
    assert _query(data / "state.db", "SELECT version FROM schema_version") == [(LATEST,)]
    # Starting again on the migrated database changes nothing (migrations are idempotent).
    srv.start()
    srv.wait_ready()
    assert [r["listen_port"] for r in srv.rules().values()] == [port]
    assert srv.stop() == 0
    assert _query(data / "state.db", "SELECT version FROM schema_version") == [(LATEST,)]


def test_newer_schema_stops_serve_with_78(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "future"
    data.mkdir()
    conn = connect_sync(str(data / "state.db"))
    migrate(conn, str(data / "state.db"))
    conn.execute("UPDATE schema_version SET version = ?", (LATEST + 1,))
    conn.close()
    srv = server(data_dir=data, start=False)
    srv.start()
    rc = srv.wait_exit(30)
    err = srv.stderr_text()
    assert rc == 78, err
    assert f"error: schema_too_new: {data / 'state.db'} has schema version {LATEST + 1} " in err
    assert f"knows only up to version {LATEST}" in err and "restore a backup" in err
    assert _query(data / "state.db", "SELECT version FROM schema_version") == [(LATEST + 1,)]
