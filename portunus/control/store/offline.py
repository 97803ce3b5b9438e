"""Synchronous store operations for code that runs without an event loop.

``serve`` calls ``check_schema`` in the supervisor before forking (so a too-new
database stops the service with exit 78 instead of a control process that dies
and is respawned forever); ``bootstrap-superadmin`` and ``backup`` are CLI verbs
that must work whether or not a server is running, which WAL + ``busy_timeout``
make safe next to a live control process.  ``restore`` and ``reset``
(``portunus.control.store.replace``) replace the file under the control process's
feet, so they refuse while anything holds the database open (``database_in_use``).

Connections here open the database read-write even to read it: the last
connection to close a WAL database checkpoints and deletes ``-wal``/``-shm``,
while a read-only one leaves them behind — owned by whoever ran the CLI (root),
where the service user could not open them at its next start.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import struct
from typing import Any

from portunus.control.identity import hash_token, validate_user_name
from portunus.control.store.migrations import (
    LATEST,
    SchemaTooNew,
    connect_sync,
    current_version,
    migrate,
    utc_now,
)
from portunus.errors import PortunusError


def check_schema(db_path: str) -> None:
    """Raise ``SchemaTooNew`` if ``db_path`` was written by a newer Portunus.

    A missing database is fine (the control process creates it); nothing is
    written here.
    """
    if not os.path.exists(db_path):
        return
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        version = current_version(conn)
    except sqlite3.DatabaseError as exc:
        raise PortunusError(
            "internal", f"{db_path} is not a readable SQLite database: {exc}"
        ) from None
    finally:
        conn.close()
    if version > LATEST:
        raise SchemaTooNew(db_path, version)


def bootstrap_superadmin(db_path: str, name: str) -> str:
    """Create user ``name`` with role superadmin and return its fresh token.

    Only the SHA-256 of the token is stored; the plaintext exists once, in the
    return value.  Refuses with ``conflict`` when the name is taken.
    """

    name = validate_user_name(name)
    os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
    created = not os.path.exists(db_path)
    conn = connect_sync(db_path)
    try:
        if created:  # it holds token hashes: not for every local user to read
            os.chmod(db_path, 0o600)
        migrate(conn, db_path)
        token = secrets.token_urlsafe(32)
        now = utc_now()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise PortunusError("conflict", f"user {name!r} already exists", user=name)
            user_id = conn.execute(
                "INSERT INTO users (name, role, created_at) VALUES (?, 'superadmin', ?)",
                (name, now),
            ).lastrowid
            token_id = conn.execute(
                "INSERT INTO tokens (user_id, token_hash, created_at) VALUES (?, ?, ?)",
                (user_id, hash_token(token), now),
            ).lastrowid
            conn.execute(
                "INSERT INTO audit (ts, actor, action, target, outcome, details) "
                "VALUES (?, 'cli:bootstrap-superadmin', 'user.bootstrap', ?, 'ok', ?)",
                (now, f"user:{name}", json.dumps({"role": "superadmin", "token_id": token_id})),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return token
    finally:
        conn.close()


def superadmin_has_password(db_path: str) -> bool:
    """True once some superadmin can log in with a password (first-run setup is
    done).  A missing database or one from before users had passwords: False."""
    if not os.path.exists(db_path):
        return False
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        row = conn.execute(
            "SELECT 1 FROM users WHERE role = 'superadmin' AND password_hash IS NOT NULL LIMIT 1"
        ).fetchone()
    except sqlite3.Error:  # no such column/table yet: the migration has not run
        return False
    finally:
        conn.close()
    return row is not None


def schema_version(db_path: str) -> int:
    """The schema version of a database file that nothing else is writing (a
    backup copy); 0 when it has none."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        return current_version(conn)
    finally:
        conn.close()


def backup(db_path: str, out_path: str) -> None:
    """Copy the database with SQLite's online backup API (consistent while the
    server writes).  The copy is written next to ``out_path`` and renamed, so a
    failed backup never leaves a truncated file under the requested name."""
    if not os.path.exists(db_path):
        raise PortunusError("not_found", f"no database at {db_path}")
    tmp = f"{out_path}.tmp-{os.getpid()}"
    src = sqlite3.connect(db_path, isolation_level=None)  # read-write: see the module doc
    try:
        src.execute("PRAGMA busy_timeout = 5000")
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.backup(dst)
            # A rollback-journal file is one self-contained file: opening the copy
            # (even read-only) never needs or leaves -wal/-shm beside it.
            dst.execute("PRAGMA journal_mode = DELETE")
        finally:
            dst.close()
        os.chmod(tmp, 0o600)
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        src.close()


# ------------------------------------------------------------------ in use?

# SQLite's unix VFS: every connection to a WAL database holds a read lock on this
# byte of the -shm file for as long as it is open (the "dead man switch"), so a
# lock here means another process — a running control process — has it open.
_SHM_DMS_OFFSET = 128


def database_in_use(db_path: str) -> bool:
    """True when another process has ``db_path`` open (WAL mode, see above).

    fcntl locks are per process: this never sees the caller's own connections.
    An unreadable -shm counts as "cannot tell" (False); the socket probe of the
    CLI and the permissions on the database itself cover that case.
    """
    try:
        fd = os.open(db_path + "-shm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, _SHM_DMS_OFFSET, 1, 0)
        got = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
    except OSError:
        return False
    finally:
        os.close(fd)
    return struct.unpack("hhqqi", got[: struct.calcsize("hhqqi")])[0] != fcntl.F_UNLCK


def server_running_error(verb: str, why: str) -> PortunusError:
    """``conflict.server_running`` for ``restore``/``reset``: they are offline only."""
    return PortunusError(
        "conflict.server_running",
        f"the server is running ({why}); {verb} replaces the database and cannot run under a "
        "live server. Stop it first (`systemctl stop portunus`, or end `portunus-server serve`), "
        f"then run {verb} again; --force does not override this",
        reason=why,
    )


def refuse_if_in_use(db_path: str, verb: str) -> None:
    if database_in_use(db_path):
        raise server_running_error(verb, f"another process has {db_path} open")


def append_audit(
    db_path: str, actor: str, action: str, target: str | None, details: dict[str, Any] | None = None
) -> None:
    """One audit row written by an offline verb (``backup``), live server or not."""
    conn = connect_sync(db_path)
    try:
        conn.execute(
            "INSERT INTO audit (ts, actor, action, target, outcome, details) VALUES (?, ?, ?, ?, 'ok', ?)",
            (
                utc_now(),
                actor,
                action,
                target,
                json.dumps(details, separators=(",", ":")) if details else None,
            ),
        )
    finally:
        conn.close()
