"""``restore`` and ``reset``: replace state.db while no server runs.

Both refuse while anything holds the database open (``refuse_if_in_use``) and keep
the previous file as ``state.db.bak-<time>`` instead of deleting it: a restore that
turns out wrong, or a reset by mistake, is undone by moving that file back.  A
restore checks the new file on a copy first (schema, tables, migrations) and swaps
it in with a rename, so a bad backup never leaves the data dir half-replaced.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
from datetime import UTC, datetime
from typing import Any

from portunus.control.store.migrations import (
    LATEST,
    connect_sync,
    current_version,
    migrate,
    utc_now,
)
from portunus.control.store.offline import refuse_if_in_use
from portunus.errors import PortunusError
from portunus.fsutil import fsync_dir

SQLITE_MAGIC = b"SQLite format 3\x00"
_SIDECARS = ("-wal", "-shm")  # SQLite's files beside state.db in WAL mode


def aside_path(db_path: str, now: datetime | None = None) -> str:
    """A free ``<db>.bak-<UTC time>`` name (``-2``, ``-3``... if taken)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    base = f"{db_path}.bak-{stamp}"
    path, n = base, 1
    while any(os.path.lexists(path + s) for s in ("", *_SIDECARS)):
        n += 1
        path = f"{base}-{n}"
    return path


def _settle(db_path: str) -> None:
    """Fold a left-over WAL (a crashed server) into the main file, so the file
    moved aside is complete on its own; closing as the last connection also
    deletes -wal/-shm.  A damaged file is moved aside as it is."""
    try:
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    except sqlite3.Error:
        pass


def _move_aside(db_path: str, aside: str, keep_name: bool) -> None:
    """Move the settled database to ``aside`` with any sidecars it still has.
    ``keep_name``: hard-link instead, so ``db_path`` never vanishes until the
    caller atomically replaces it (a rename is the fallback)."""
    _settle(db_path)
    moved = False
    if keep_name:
        try:
            os.link(db_path, aside)
            moved = True
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links
            pass
    if not moved:
        os.rename(db_path, aside)
    for suffix in _SIDECARS:
        if os.path.lexists(db_path + suffix):
            os.rename(db_path + suffix, aside + suffix)


def _drop_sidecars(db_path: str) -> None:
    for suffix in _SIDECARS:
        try:
            os.unlink(db_path + suffix)
        except FileNotFoundError:
            pass


def reset(db_path: str) -> str | None:
    """Move ``db_path`` aside (never delete it) so the next start begins empty;
    return where it went, or None when there was no database."""
    refuse_if_in_use(db_path, "reset")
    if not os.path.lexists(db_path):
        _drop_sidecars(db_path)  # a WAL without its database is of no use to anyone
        return None
    aside = aside_path(db_path)
    _move_aside(db_path, aside, keep_name=False)
    fsync_dir(os.path.dirname(os.path.abspath(db_path)))
    return aside


def database_summary(db_path: str) -> dict[str, int] | None:
    """What restoring over ``db_path`` would replace: rules, enrolled clients,
    users and API tokens beyond the built-in ``local`` node and ``operator``.
    ``{}``-like zeros for a fresh database; None when it cannot be read."""
    queries = {
        "rules": "SELECT count(*) FROM rules",
        "clients": "SELECT count(*) FROM clients WHERE client_id != 'local'",
        "users": "SELECT count(*) FROM users WHERE name != 'operator'",
        "tokens": "SELECT count(*) FROM tokens WHERE label IS NULL OR label != 'operator'",
    }
    out: dict[str, int] = {}
    try:
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=5.0)
    except sqlite3.Error:
        return None
    try:
        for key, sql in queries.items():
            try:
                out[key] = int(conn.execute(sql).fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):
                    return None
                out[key] = 0
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()
    return out


@functools.cache
def _expected_tables() -> frozenset[str]:
    """Every table the migrations create, found by running them in memory."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(conn, ":memory:")
        return frozenset(
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        )
    finally:
        conn.close()


def _not_a_backup(path: str, why: str) -> PortunusError:
    return PortunusError(
        "validation.not_a_backup", f"{path} is not a usable Portunus backup: {why}", field="in"
    )


def _prepare_copy(in_path: str, tmp: str, actor: str, aside: str | None) -> tuple[int, int]:
    """Validate and migrate the copy at ``tmp`` and audit the restore in it;
    returns (schema version found, rules).  Raises a PortunusError on a bad file."""
    with open(tmp, "rb") as f:
        if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            raise _not_a_backup(in_path, "not a SQLite database")
    try:
        conn = connect_sync(tmp)
    except sqlite3.DatabaseError as exc:
        raise _not_a_backup(in_path, f"SQLite cannot open it ({exc})") from None
    try:
        try:
            problems = [r[0] for r in conn.execute("PRAGMA integrity_check(5)")]
            if problems != ["ok"]:
                why = "; ".join(" ".join(p.split()) for p in problems)
                raise _not_a_backup(in_path, f"SQLite's integrity check failed: {why}")
            found = current_version(conn)
        except sqlite3.DatabaseError as exc:
            raise _not_a_backup(in_path, f"unreadable ({exc})") from None
        if found > LATEST:
            raise PortunusError(
                "schema_too_new",
                f"{in_path} has schema version {found} but this Portunus knows only up to version "
                f"{LATEST}; restore it with the newer Portunus that wrote it, or pick an older backup",
                found=found,
                known=LATEST,
            )
        if found < 1:
            raise _not_a_backup(in_path, "it has no schema_version table (not written by Portunus)")
        migrate(conn, tmp)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = sorted(_expected_tables() - tables)
        if missing:
            raise _not_a_backup(in_path, f"tables missing: {', '.join(missing)}")
        rules = int(conn.execute("SELECT count(*) FROM rules").fetchone()[0])
        # Login sessions do not outlive a restore: users log in again (users,
        # their tokens and grants are restored with everything else).
        conn.execute("DELETE FROM sessions")
        details = {
            "source": os.path.abspath(in_path),
            "from_schema_version": found,
            "schema_version": LATEST,
            "previous": aside,
        }
        conn.execute(
            "INSERT INTO audit (ts, actor, action, target, outcome, details) "
            "VALUES (?, ?, 'storage.restore', ?, 'ok', ?)",
            (
                utc_now(),
                actor,
                f"file:{os.path.abspath(in_path)}",
                json.dumps(details, separators=(",", ":")),
            ),
        )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return found, rules


def _match_owner(path: str, like: str) -> None:
    """Run as root (``sudo portunus-server restore``), give the new file the
    owner the service runs as: that of the old database or of the data dir."""
    if os.geteuid() != 0:
        return
    st = os.stat(like)
    os.chown(path, st.st_uid, st.st_gid)


def restore(db_path: str, in_path: str, actor: str, force: bool = False) -> dict[str, Any]:
    """Replace ``db_path`` with the backup ``in_path``, offline only.

    The backup is copied next to the database (the input file is never opened
    by SQLite, so never changed), validated (SQLite header, integrity check,
    our schema_version, not newer than this code: exit 78), migrated, and the
    restore is audited inside it.  Only then is the current database kept as
    ``<db>.bak-<time>`` and the copy renamed over it.  Without ``force`` a
    database that holds rules, clients, users or tokens is not replaced.
    """
    if not os.path.isfile(in_path):
        raise PortunusError("not_found", f"no backup file at {in_path}", field="in")
    refuse_if_in_use(db_path, "restore")
    data_dir = os.path.dirname(os.path.abspath(db_path))
    os.makedirs(data_dir, mode=0o750, exist_ok=True)  # as `serve` makes it
    exists = os.path.lexists(db_path)
    if exists and os.path.samefile(db_path, in_path):
        raise _not_a_backup(in_path, "it is the live database itself")
    tmp = f"{db_path}.restore-{os.getpid()}"
    aside = aside_path(db_path) if exists else None
    try:
        shutil.copyfile(in_path, tmp)
        if os.path.isfile(in_path + "-wal"):  # a copied live database: its last commits
            shutil.copyfile(in_path + "-wal", tmp + "-wal")
        os.chmod(tmp, 0o600)
        found, rules = _prepare_copy(in_path, tmp, actor, aside)
        if exists and not force:
            summary = database_summary(db_path)
            if summary is None or any(summary.values()):
                what = (
                    "cannot be read"
                    if summary is None
                    else "holds " + ", ".join(f"{n} {k}" for k, n in summary.items() if n)
                )
                raise PortunusError(
                    "conflict.database_not_empty",
                    f"{db_path} {what}; restoring replaces all of it with the backup "
                    f"(the current file would be kept as {aside}). Add --force to go ahead",
                    current=summary,
                )
        _drop_sidecars(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _match_owner(tmp, db_path if exists else data_dir)
        refuse_if_in_use(db_path, "restore")  # again: a server may have started meanwhile
        if aside is not None:
            _move_aside(db_path, aside, keep_name=True)
        os.replace(tmp, db_path)
        _drop_sidecars(db_path)
        fsync_dir(data_dir)
    finally:
        for path in (tmp, tmp + "-wal", tmp + "-shm"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return {
        "database": db_path,
        "source": os.path.abspath(in_path),
        "from_schema_version": found,
        "schema_version": LATEST,
        "previous": aside,
        "rules": rules,
    }
