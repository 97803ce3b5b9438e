"""Synchronous store operations for code that runs without an event loop.

``serve`` calls ``check_schema`` in the supervisor before forking (so a too-new
database stops the service with exit 78 instead of a control process that dies
and is respawned forever); ``bootstrap-superadmin`` and ``backup`` are CLI verbs
that must work whether or not a server is running, which WAL + ``busy_timeout``
make safe next to a live control process.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3

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
        raise PortunusError("internal", f"{db_path} is not a readable SQLite database: {exc}") from None
    finally:
        conn.close()
    if version > LATEST:
        raise SchemaTooNew(db_path, version)


def bootstrap_superadmin(db_path: str, name: str) -> str:
    """Create user ``name`` with role superadmin and return its fresh token.

    Only the SHA-256 of the token is stored; the plaintext exists once, in the
    return value.  Refuses with ``conflict`` when the name is taken.
    """
    from portunus.control.auth import hash_token, validate_user_name

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
                "INSERT INTO users (name, role, created_at) VALUES (?, 'superadmin', ?)", (name, now)
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


def backup(db_path: str, out_path: str) -> None:
    """Copy the database with SQLite's online backup API (consistent while the
    server writes).  The copy is written next to ``out_path`` and renamed, so a
    failed backup never leaves a truncated file under the requested name."""
    if not os.path.exists(db_path):
        raise PortunusError("not_found", f"no database at {db_path}")
    tmp = f"{out_path}.tmp-{os.getpid()}"
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        src.execute("PRAGMA busy_timeout = 5000")
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
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
