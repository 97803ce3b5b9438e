from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from portunus.control.store import LATEST, SchemaTooNew, Store, check_schema, migrations
from portunus.errors import EXIT_SCHEMA_TOO_NEW


def _tables(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")
        }
    finally:
        conn.close()


def _version(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return migrations.current_version(conn)
    finally:
        conn.close()


async def test_fresh_database_gets_every_migration(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = await Store.open(str(db))
    try:
        async with store.read() as conn:
            async with conn.execute("PRAGMA journal_mode") as cur:
                assert (await cur.fetchone())[0] == "wal"
            async with conn.execute("PRAGMA foreign_keys") as cur:
                assert (await cur.fetchone())[0] == 1
            async with conn.execute("SELECT client_id, name FROM clients") as cur:
                assert [tuple(r) for r in await cur.fetchall()] == [("local", "local")]
            async with conn.execute("SELECT name, role FROM users") as cur:
                assert [tuple(r) for r in await cur.fetchall()] == [("operator", "superadmin")]
    finally:
        await store.close()
    assert _version(db) == LATEST == len(migrations.MIGRATIONS) == 11
    assert {
        "clients",
        "rules",
        "rule_targets",
        "users",
        "tokens",
        "audit",
        "schema_version",
        "rule_counters",
    } <= _tables(db)


async def test_upgrade_from_v1_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    conn = migrations.connect_sync(str(db))
    assert migrations.migrate(conn, str(db), target=1) == 1
    conn.execute(
        "INSERT INTO rules (client_id, protocol, listen_start, listen_end, state, created_at) "
        "VALUES ('local', 'tcp', 8080, 8080, 'active', 'x')"
    )
    conn.close()
    assert "rules_by_slot" not in _tables(db)
    store = await Store.open(str(db))
    await store.close()
    assert _version(db) == LATEST
    assert {"rules_by_slot", "audit_by_ts", "tokens_by_user"} <= _tables(db)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT listen_start, state FROM rules").fetchall() == [(8080, "active")]
    conn.close()


def test_upgrade_to_v4_marks_the_fallbacks_of_sni_ports(tmp_path: Path) -> None:
    """A v3 database: the fallback of an SNI port becomes sni_fallback; a plain port's
    rule, a fallback whose SNI rule is draining and another client's rule do not."""
    db = str(tmp_path / "state.db")
    conn = migrations.connect_sync(db)
    assert migrations.migrate(conn, db, target=3) == 3
    conn.execute("INSERT INTO clients (client_id, name, created_at) VALUES ('edge1', 'e', 'x')")
    rows = [  # (client, port, sni_pattern, state)
        ("local", 443, "api.example.test", "active"),
        ("local", 443, None, "active"),  # fallback of an SNI port
        ("local", 8443, None, "active"),  # plain port
        ("local", 9443, "old.example.test", "draining"),
        ("local", 9443, None, "active"),  # its SNI rule is going away: plain from now on
        ("edge1", 443, None, "active"),  # same port, other client
    ]
    for client, port, sni, state in rows:
        conn.execute(
            "INSERT INTO rules (client_id, protocol, listen_start, listen_end, sni_pattern, state, "
            "created_at) VALUES (?, 'tcp', ?, ?, ?, ?, 'x')",
            (client, port, port, sni, state),
        )
    assert migrations.migrate(conn, db) == LATEST
    got = conn.execute(
        "SELECT client_id, listen_start, sni_pattern, sni_fallback FROM rules ORDER BY id"
    ).fetchall()
    conn.close()
    assert [r[3] for r in got] == [0, 1, 0, 0, 0, 0], got


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    conn = migrations.connect_sync(db)
    assert migrations.migrate(conn, db) == LATEST
    assert migrations.migrate(conn, db) == LATEST
    assert conn.execute("SELECT COUNT(*) FROM clients").fetchone()[0] == 1
    conn.close()


def test_failing_migration_leaves_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "state.db")
    conn = migrations.connect_sync(db)
    migrations.migrate(conn, db)
    broken = "CREATE TABLE extra (x INTEGER);\nINSERT INTO no_such_table VALUES (1);\n"
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, broken])
    monkeypatch.setattr(migrations, "LATEST", LATEST + 1)
    with pytest.raises(sqlite3.OperationalError):
        migrations.migrate(conn, db)
    assert migrations.current_version(conn) == LATEST
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None
    conn.close()


def _bump_version(db: Path, version: int) -> None:
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version = ?", (version,))
    conn.commit()
    conn.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    await (await Store.open(str(db))).close()
    check_schema(str(db))  # current version: fine
    _bump_version(db, LATEST + 3)
    with pytest.raises(SchemaTooNew) as info:
        check_schema(str(db))
    err = info.value
    assert err.code == "schema_too_new"
    assert err.exit_code == EXIT_SCHEMA_TOO_NEW == 78
    assert f"version {LATEST + 3}" in err.message and f"version {LATEST}" in err.message
    assert "newer Portunus" in err.message and "backup" in err.message
    with pytest.raises(SchemaTooNew):
        await Store.open(str(db))
    assert _version(db) == LATEST + 3  # untouched


def test_check_schema_on_missing_database_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "nope" / "state.db"
    check_schema(str(db))
    assert not db.exists()


def test_split_statements_respects_quotes() -> None:
    script = (
        "CREATE TABLE a (x TEXT DEFAULT 'a;b');\n-- note; here\nINSERT INTO a VALUES ('c;d');\n"
    )
    stmts = migrations.split_statements(script)
    assert len(stmts) == 2
    assert stmts[0].startswith("CREATE TABLE a") and stmts[1].endswith("('c;d');")


async def test_upgrade_clamps_non_finite_health_check_intervals(tmp_path: Path) -> None:
    """A rule stored with an `inf` interval before the bounds existed lists again."""
    db = tmp_path / "state.db"
    conn = migrations.connect_sync(str(db))
    version = migrations.migrate(conn, str(db), target=4)
    assert version == 4
    for port, interval in ((8080, float("inf")), (8081, 0.001), (8082, 7.5)):
        conn.execute(
            "INSERT INTO rules (client_id, protocol, listen_start, listen_end, state, created_at, "
            "health_check_interval_secs) VALUES ('local', 'tcp', ?, ?, 'active', 'x', ?)",
            (port, port, interval),
        )
    conn.close()
    store = await Store.open(str(db))
    try:
        async with (
            store.read() as c,
            c.execute(
                "SELECT listen_start, health_check_interval_secs FROM rules ORDER BY listen_start"
            ) as cur,
        ):
            assert [tuple(r) for r in await cur.fetchall()] == [
                (8080, 3600.0),
                (8081, 0.1),
                (8082, 7.5),
            ]
    finally:
        await store.close()
