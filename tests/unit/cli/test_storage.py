"""backup, restore and reset against real state.db files (the server-running
cases use the fake control socket, or a second process holding the database)."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from portunus.cli.server import cli
from portunus.control.store import offline
from portunus.control.store.migrations import LATEST, connect_sync, current_version, migrate
from portunus.errors import EXIT_SCHEMA_TOO_NEW

ME = "os:" + pwd.getpwuid(os.geteuid()).pw_name


def make_db(path: Path, version: int = LATEST, ports: tuple[int, ...] = (8080,)) -> None:
    """A database at ``version`` holding one active rule per port."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect_sync(str(path))
    try:
        assert migrate(conn, str(path), target=version) == version
        for port in ports:
            rid = conn.execute(
                "INSERT INTO rules (client_id, protocol, listen_start, listen_end, state, created_at) "
                "VALUES ('local', 'tcp', ?, ?, 'active', 'x')",
                (port, port),
            ).lastrowid
            conn.execute(
                "INSERT INTO rule_targets (rule_id, position, host, port, priority) "
                "VALUES (?, 0, '127.0.0.1', 9, 1)",
                (rid,),
            )
    finally:
        conn.close()


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def ports_of(path: Path) -> list[int]:
    return [r[0] for r in query(path, "SELECT listen_start FROM rules ORDER BY id")]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(
        cli, ["--data-dir", str(data_dir), *args], prog_name="portunus-server"
    )


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """``holder(db)``: another process with ``db`` open, as a running control process has."""
    procs: list[subprocess.Popen[str]] = []

    def start(db: Path) -> subprocess.Popen[str]:
        code = (
            "import sys; from portunus.control.store.migrations import connect_sync; "
            "c = connect_sync(sys.argv[1]); c.execute('SELECT count(*) FROM rules').fetchall(); "
            "print('ready', flush=True); sys.stdin.read()"
        )
        p = subprocess.Popen(
            [sys.executable, "-c", code, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait(5)
        for stream in (p.stdin, p.stdout):
            if stream is not None:
                stream.close()


def siblings(data_dir: Path) -> set[str]:
    return {p.name for p in data_dir.iterdir() if p.name != "run"}


# ------------------------------------------------------------------ backup


def test_backup_copies_and_audits_in_the_source(tmp_path: Path) -> None:
    data = tmp_path / "d"
    make_db(data / "state.db", ports=(8080, 8081))
    out = tmp_path / "b.db"
    res = invoke(data, "backup", "--out", str(out), "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == {
        "database": str(data / "state.db"),
        "out": str(out),
        "bytes": out.stat().st_size,
        "schema_version": LATEST,
        "audited": True,
    }
    assert ports_of(out) == [8080, 8081]
    assert out.stat().st_mode & 0o777 == 0o600
    # One self-contained file: a rollback journal, nothing beside it, even once opened.
    assert query(out, "PRAGMA journal_mode") == [("delete",)]
    assert not list(tmp_path.glob("b.db?*"))
    rows = query(data / "state.db", "SELECT actor, action, target, outcome, details FROM audit")
    assert rows[-1][:4] == (ME, "storage.backup", f"file:{out}", "ok")
    assert json.loads(rows[-1][4]) == {"bytes": doc["bytes"], "schema_version": LATEST}
    # Offline, the CLI was the last connection: no -wal/-shm owned by it stay behind.
    assert siblings(data) == {"state.db"}


def test_offline_backup_leaves_no_sidecars_of_its_own(tmp_path: Path) -> None:
    """Run by root next to a stopped service, a read-only connection would leave
    root-owned -wal/-shm that the service user cannot open at its next start."""
    data = tmp_path / "d"
    make_db(data / "state.db")
    offline.backup(str(data / "state.db"), str(tmp_path / "b.db"))
    assert siblings(data) == {"state.db"}
    assert offline.schema_version(str(tmp_path / "b.db")) == LATEST


def test_backup_text_and_directory_out(tmp_path: Path) -> None:
    data = tmp_path / "d"
    make_db(data / "state.db")
    outdir = tmp_path / "backups"
    outdir.mkdir()
    res = invoke(data, "backup", "--out", str(outdir))
    assert res.exit_code == 0, res.stderr
    (made,) = outdir.iterdir()
    assert made.name.startswith("portunus-") and made.suffix == ".db"
    assert res.stdout.startswith(f"backed up {data / 'state.db'} to {made} (")
    assert ports_of(made) == [8080]


def test_backup_while_another_process_writes(tmp_path: Path, holder) -> None:
    data = tmp_path / "d"
    make_db(data / "state.db")
    holder(data / "state.db")
    assert offline.database_in_use(str(data / "state.db"))
    res = invoke(data, "backup", "--out", str(tmp_path / "b.db"))
    assert res.exit_code == 0, res.stderr
    assert ports_of(tmp_path / "b.db") == [8080]


def test_backup_refuses_to_overwrite_the_live_database(tmp_path: Path) -> None:
    data = tmp_path / "d"
    make_db(data / "state.db")
    before = sha(data / "state.db")
    for target in ("state.db", "state.db-wal"):
        res = invoke(data, "backup", "--out", str(data / target))
        assert res.exit_code == 2, res.stdout
        assert res.stderr.startswith("error: validation.out: ")
    assert sha(data / "state.db") == before


def test_backup_without_database_exit_5(tmp_path: Path) -> None:
    res = invoke(tmp_path / "d", "backup", "--out", str(tmp_path / "b.db"))
    assert res.exit_code == 5
    assert res.stderr.startswith("error: not_found: no database at ")
    assert not (tmp_path / "b.db").exists()


def test_backup_into_missing_directory_is_an_io_error(tmp_path: Path) -> None:
    make_db(tmp_path / "d" / "state.db")
    res = invoke(tmp_path / "d", "backup", "--out", str(tmp_path / "nope" / "b.db"))
    assert res.exit_code == 1
    assert res.stderr.startswith(
        f"error: io_error: cannot copy {tmp_path / 'd' / 'state.db'} to "
        f"{tmp_path / 'nope' / 'b.db'}: "
    )


# ------------------------------------------------------------------ restore


def test_restore_into_empty_data_dir_migrates_and_audits(tmp_path: Path) -> None:
    backup = tmp_path / "old.db"
    make_db(backup, version=1, ports=(9000,))
    before = sha(backup)
    data = tmp_path / "d"
    res = invoke(data, "restore", "--in", str(backup), "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == {
        "database": str(data / "state.db"),
        "source": str(backup),
        "from_schema_version": 1,
        "schema_version": LATEST,
        "previous": None,
        "rules": 1,
    }
    db = data / "state.db"
    assert query(db, "SELECT version FROM schema_version") == [(LATEST,)]
    assert ports_of(db) == [9000]
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    (row,) = query(db, "SELECT actor, action, target, outcome, details FROM audit")
    assert row[:4] == (ME, "storage.restore", f"file:{backup}", "ok")
    assert json.loads(row[4])["from_schema_version"] == 1
    assert db.stat().st_mode & 0o777 == 0o600
    assert sha(backup) == before and not list(tmp_path.glob("old.db?*"))  # input untouched
    assert siblings(data) == {"state.db"}


def test_restore_over_fresh_database_needs_no_force_and_keeps_it(tmp_path: Path) -> None:
    data = tmp_path / "d"
    make_db(data / "state.db", ports=())
    old = sha(data / "state.db")
    make_db(tmp_path / "b.db", ports=(7000,))
    res = invoke(data, "restore", "--in", str(tmp_path / "b.db"))
    assert res.exit_code == 0, res.stderr
    (aside,) = data.glob("state.db.bak-*")
    assert sha(aside) == old
    assert f"the previous database is kept as {aside}" in res.stdout
    assert ports_of(data / "state.db") == [7000]


def test_restore_over_data_needs_force(tmp_path: Path) -> None:
    data = tmp_path / "d"
    make_db(data / "state.db", ports=(1111, 1112))
    old = sha(data / "state.db")
    make_db(tmp_path / "b.db", ports=(2222,))
    res = invoke(data, "restore", "--in", str(tmp_path / "b.db"))
    assert res.exit_code == 10, res.stdout
    assert res.stderr.startswith("error: conflict.database_not_empty: ")
    assert "holds 2 rules" in res.stderr and "--force" in res.stderr
    assert sha(data / "state.db") == old and siblings(data) == {"state.db"}

    res = invoke(data, "restore", "--in", str(tmp_path / "b.db"), "--force")
    assert res.exit_code == 0, res.stderr
    assert ports_of(data / "state.db") == [2222]
    (aside,) = data.glob("state.db.bak-*")
    assert ports_of(aside) == [1111, 1112]
    assert siblings(data) == {"state.db", aside.name}


def test_restore_keeps_the_uncheckpointed_wal_of_a_crashed_server(tmp_path: Path) -> None:
    """A server killed with commits still in state.db-wal: they end up in the .bak."""
    live = tmp_path / "live"
    make_db(live / "state.db", ports=(1111,))
    conn = connect_sync(str(live / "state.db"))
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute(
        "INSERT INTO rules (client_id, protocol, listen_start, listen_end, state, created_at) "
        "VALUES ('local', 'tcp', 1112, 1112, 'active', 'x')"
    )
    data = tmp_path / "d"
    data.mkdir()
    for suffix in ("", "-wal"):  # the files as a crash leaves them
        (data / f"state.db{suffix}").write_bytes((live / f"state.db{suffix}").read_bytes())
    conn.close()
    assert (data / "state.db-wal").stat().st_size > 0
    make_db(tmp_path / "b.db", ports=(2222,))
    res = invoke(data, "restore", "--in", str(tmp_path / "b.db"), "--force")
    assert res.exit_code == 0, res.stderr
    (aside,) = data.glob("state.db.bak-*")
    assert ports_of(aside) == [1111, 1112]
    assert siblings(data) == {"state.db", aside.name}  # the stale -wal/-shm are gone
    assert ports_of(data / "state.db") == [2222]


def test_restore_drops_stale_sidecars_without_database(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "state.db-wal").write_bytes(b"\0" * 4096)
    (data / "state.db-shm").write_bytes(b"\0" * 4096)
    make_db(tmp_path / "b.db", ports=(2222,))
    res = invoke(data, "restore", "--in", str(tmp_path / "b.db"))
    assert res.exit_code == 0, res.stderr
    assert siblings(data) == {"state.db"}
    assert ports_of(data / "state.db") == [2222]


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "not a SQLite database"),
        (b"hello, this is not a database at all" * 200, "not a SQLite database"),
    ],
)
def test_restore_refuses_non_sqlite_files(tmp_path: Path, content: bytes, why: str) -> None:
    data = tmp_path / "d"
    make_db(data / "state.db")
    old = sha(data / "state.db")
    bad = tmp_path / "bad.db"
    bad.write_bytes(content)
    res = invoke(data, "restore", "--in", str(bad), "--force")
    assert res.exit_code == 2
    assert res.stderr.startswith(
        f"error: validation.not_a_backup: {bad} is not a usable Portunus backup: {why}"
    )
    assert sha(data / "state.db") == old and siblings(data) == {"state.db"}


def test_restore_refuses_a_foreign_sqlite_database(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    res = invoke(tmp_path / "d", "restore", "--in", str(other))
    assert res.exit_code == 2
    assert "no schema_version table" in res.stderr
    assert not (tmp_path / "d" / "state.db").exists()


def test_restore_refuses_a_damaged_backup(tmp_path: Path) -> None:
    backup = tmp_path / "b.db"
    make_db(backup, ports=tuple(range(2000, 2400)))
    conn = sqlite3.connect(backup)
    conn.execute("PRAGMA journal_mode = DELETE")
    (root,) = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'rules_by_slot'"
    ).fetchone()
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    raw = bytearray(backup.read_bytes())
    start = (root - 1) * page
    raw[start + 100 : start + page] = b"\xa5" * (page - 100)  # trash the index's root page
    backup.write_bytes(bytes(raw))
    res = invoke(tmp_path / "d", "restore", "--in", str(backup))
    assert res.exit_code == 2, res.stdout
    assert res.stderr.startswith(
        f"error: validation.not_a_backup: {backup} is not a usable Portunus backup"
    )
    assert not (tmp_path / "d").exists() or siblings(tmp_path / "d") == set()


def test_restore_refuses_a_backup_failing_the_integrity_check(tmp_path: Path) -> None:
    backup = tmp_path / "b.db"
    make_db(backup, ports=(1, 2, 3))
    conn = sqlite3.connect(backup, isolation_level=None)
    (other,) = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'audit_by_ts'"
    ).fetchone()
    conn.execute("PRAGMA writable_schema = ON")  # point an index at another one's pages
    conn.execute("UPDATE sqlite_master SET rootpage = ? WHERE name = 'rules_by_slot'", (other,))
    conn.close()
    data = tmp_path / "d"
    make_db(data / "state.db", ports=())
    res = invoke(data, "restore", "--in", str(backup), "--force")
    assert res.exit_code == 2, res.stdout
    assert "SQLite's integrity check failed: " in res.stderr
    assert "row 1 missing from index rules_by_slot" in res.stderr
    assert siblings(data) == {"state.db"}


def test_restore_refuses_a_newer_schema_with_78(tmp_path: Path) -> None:
    backup = tmp_path / "future.db"
    make_db(backup)
    conn = sqlite3.connect(backup)
    conn.execute("UPDATE schema_version SET version = ?", (LATEST + 1,))
    conn.commit()
    conn.close()
    data = tmp_path / "d"
    make_db(data / "state.db", ports=())
    res = invoke(data, "restore", "--in", str(backup), "--force")
    assert res.exit_code == EXIT_SCHEMA_TOO_NEW == 78
    assert res.stderr.startswith(
        f"error: schema_too_new: {backup} has schema version {LATEST + 1} "
    )
    assert f"only up to version {LATEST}" in res.stderr
    assert siblings(data) == {"state.db"}


def test_restore_an_older_backup_over_a_newer_schema(tmp_path: Path) -> None:
    """After a downgrade serve exits 78; restoring an older backup is the way out."""
    data = tmp_path / "d"
    make_db(data / "state.db", ports=(1111,))
    conn = sqlite3.connect(data / "state.db")
    conn.execute("UPDATE schema_version SET version = ?", (LATEST + 1,))
    conn.commit()
    conn.close()
    make_db(tmp_path / "b.db", version=1, ports=(2222,))
    res = invoke(data, "restore", "--in", str(tmp_path / "b.db"), "--force")
    assert res.exit_code == 0, res.stderr
    offline.check_schema(str(data / "state.db"))  # what serve checks: no longer too new
    assert ports_of(data / "state.db") == [2222]
    (aside,) = data.glob("state.db.bak-*")
    assert query(aside, "SELECT version FROM schema_version") == [(LATEST + 1,)]


def test_restore_missing_file_exit_5(tmp_path: Path) -> None:
    res = invoke(tmp_path / "d", "restore", "--in", str(tmp_path / "nope.db"))
    assert res.exit_code == 5
    assert res.stderr.startswith("error: not_found: no backup file at ")


def test_restore_of_the_live_file_itself_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "d"
    make_db(data / "state.db")
    res = invoke(data, "restore", "--in", str(data / "state.db"), "--force")
    assert res.exit_code == 2
    assert "the live database itself" in res.stderr


def test_restore_is_repeatable(tmp_path: Path) -> None:
    """Restoring the same current-version backup twice: migrations are a no-op the second time."""
    make_db(tmp_path / "b.db", ports=(3000,))
    data = tmp_path / "d"
    for _ in range(2):
        res = invoke(data, "restore", "--in", str(tmp_path / "b.db"), "--force")
        assert res.exit_code == 0, res.stderr
    assert ports_of(data / "state.db") == [3000]
    assert len(list(data.glob("state.db.bak-*"))) == 1
    conn = sqlite3.connect(data / "state.db")
    try:
        assert current_version(conn) == LATEST
    finally:
        conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_restore_as_root_gives_the_file_to_the_data_dir_owner(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    data = tmp_path / "d"
    data.mkdir()
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    make_db(tmp_path / "b.db")
    res = invoke(data, "restore", "--in", str(tmp_path / "b.db"))
    assert res.exit_code == 0, res.stderr
    st = (data / "state.db").stat()
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)


# ------------------------------------------------------------------ the server is running


def test_restore_and_reset_refuse_when_the_control_socket_answers(
    control, run, tmp_path: Path
) -> None:
    control.reply("health", {"status": "ok"})
    data = Path(control.data_dir)
    make_db(data / "state.db")
    old = sha(data / "state.db")
    make_db(tmp_path / "b.db", ports=(2222,))
    for args in (("restore", "--in", str(tmp_path / "b.db"), "--force"), ("reset", "--confirm")):
        res = run(*args, env={"PORTUNUS_OPERATOR_TOKEN": None})
        assert res.exit_code == 10, res.stdout
        assert res.stderr.startswith(
            "error: conflict.server_running: the server is running (its control "
            f"socket {control.path} answers); {args[0]} replaces the database"
        )
        assert "systemctl stop portunus" in res.stderr and "--force does not override" in res.stderr
    assert [r["method"] for r in control.requests] == ["health", "health"]
    assert control.requests[0]["token"] is None
    assert sha(data / "state.db") == old and siblings(data) == {"state.db"}


def test_an_error_reply_to_health_still_means_running(control, run) -> None:
    from portunus.errors import PortunusError

    control.reply("health", PortunusError("internal", "busy"))
    res = run("reset", "--confirm")
    assert res.exit_code == 10


def test_restore_and_reset_refuse_while_another_process_has_the_database(
    tmp_path: Path, holder
) -> None:
    """No socket answers (another runtime dir), but the database is open elsewhere."""
    data = tmp_path / "d"
    make_db(data / "state.db")
    make_db(tmp_path / "b.db", ports=(2222,))
    proc = holder(data / "state.db")
    for args in (("restore", "--in", str(tmp_path / "b.db"), "--force"), ("reset", "--confirm")):
        res = invoke(data, *args)
        assert res.exit_code == 10, res.stdout
        assert f"another process has {data / 'state.db'} open" in res.stderr
    assert ports_of(data / "state.db") == [8080]
    proc.kill()
    proc.wait(5)
    assert not offline.database_in_use(str(data / "state.db"))  # a stale -shm is not a server
    assert invoke(data, "reset", "--confirm").exit_code == 0


def test_database_in_use_without_any_database(tmp_path: Path) -> None:
    assert not offline.database_in_use(str(tmp_path / "state.db"))


# ------------------------------------------------------------------ reset


def test_reset_needs_confirm(tmp_path: Path) -> None:
    data = tmp_path / "d"
    make_db(data / "state.db")
    res = invoke(data, "reset")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: validation.confirm_required: ")
    assert "--confirm" in res.stderr
    assert siblings(data) == {"state.db"}


def test_reset_moves_the_database_aside_and_says_where(tmp_path: Path) -> None:
    data = tmp_path / "d"
    make_db(data / "state.db", ports=(4000,))
    res = invoke(data, "reset", "--confirm")
    assert res.exit_code == 0, res.stderr
    (aside,) = data.glob("state.db.bak-*")
    assert res.stdout.startswith(f"moved {data / 'state.db'} to {aside}\n")
    assert siblings(data) == {aside.name}
    assert ports_of(aside) == [4000]
    # Undo = restore the moved file (nothing there now, so no --force needed).
    res = invoke(data, "restore", "--in", str(aside))
    assert res.exit_code == 0, res.stderr
    assert ports_of(data / "state.db") == [4000]


def test_reset_twice_in_one_second_keeps_both(tmp_path: Path) -> None:
    data = tmp_path / "d"
    for port in (1, 2):
        make_db(data / "state.db", ports=(port,))
        res = invoke(data, "reset", "--confirm", "--format", "json")
        assert res.exit_code == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["database"] == str(data / "state.db")
        assert ports_of(Path(doc["moved_to"])) == [port]
    assert len(list(data.glob("state.db.bak-*"))) == 2


def test_reset_without_database(tmp_path: Path) -> None:
    res = invoke(tmp_path / "d", "reset", "--confirm")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("no database at ")
    res = invoke(tmp_path / "d", "reset", "--confirm", "--format", "json")
    assert json.loads(res.stdout) == {
        "database": str(tmp_path / "d" / "state.db"),
        "moved_to": None,
    }


# ------------------------------------------------------------------ help


@pytest.mark.parametrize("verb", ["backup", "restore", "reset"])
def test_help_has_an_example_and_format(verb: str) -> None:
    top = CliRunner().invoke(cli, ["--help"])
    assert f"  {verb} " in top.stdout
    res = CliRunner().invoke(cli, [verb, "--help"])
    assert res.exit_code == 0
    assert "--format [text|json]" in res.stdout
    assert f"portunus-server {verb} " in res.stdout.split("Example", 1)[1]
