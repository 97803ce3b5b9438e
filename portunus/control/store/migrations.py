"""Numbered schema migrations for state.db, and the guard against a newer schema.

``MIGRATIONS[i]`` upgrades a database from version ``i`` to ``i + 1``.  Append new
scripts; never edit one that has shipped (installed databases already ran it).
Migrations run synchronously with plain ``sqlite3`` because they happen once,
before anything else touches the database: at control start (before the event
loop serves anyone) and from the offline CLI verbs.  All pending scripts run in
one ``BEGIN IMMEDIATE`` transaction, so two processes migrating at once (``serve``
and ``bootstrap-superadmin``) serialise and a crash leaves the old version intact.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

from portunus.errors import PortunusError

BUSY_TIMEOUT_MS = 5000

_V1 = """
CREATE TABLE clients (
    client_id   TEXT PRIMARY KEY,          -- ULID; the built-in node is 'local'
    name        TEXT NOT NULL,             -- free-form, not unique (ambiguous_client)
    created_at  TEXT NOT NULL,
    revoked_at  TEXT,
    token_hash  TEXT                       -- SHA-256 hex of the edge credential
);
INSERT INTO clients (client_id, name, created_at) VALUES ('local', 'local', :now);

CREATE TABLE users (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,             -- superadmin | admin | operator | viewer
    created_at  TEXT NOT NULL
);
-- Holder of the operator token (server.toml operator_token / operator.token).
INSERT INTO users (name, role, created_at) VALUES ('operator', 'superadmin', :now);

CREATE TABLE tokens (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    token_hash   TEXT NOT NULL UNIQUE,     -- SHA-256 hex; the plaintext is never stored
    label        TEXT,                     -- 'operator' marks the upserted operator token
    created_at   TEXT NOT NULL,
    last_used_at TEXT
);

CREATE TABLE rules (
    id                         INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is a metric label
    client_id                  TEXT NOT NULL REFERENCES clients(client_id),
    protocol                   TEXT NOT NULL,
    listen_start               INTEGER NOT NULL,
    listen_end                 INTEGER NOT NULL,
    sni_pattern                TEXT,
    proxy_protocol             TEXT,
    prefer_ipv6                INTEGER NOT NULL DEFAULT 0,
    rate_limit                 TEXT,       -- JSON object or NULL
    health_check_interval_secs REAL NOT NULL DEFAULT 5.0,
    owner                      TEXT NOT NULL DEFAULT '',
    state                      TEXT NOT NULL,  -- pending | active | failed | draining
    failure_reason             TEXT,
    created_at                 TEXT NOT NULL
);

CREATE TABLE rule_targets (
    rule_id        INTEGER NOT NULL REFERENCES rules(id) ON DELETE CASCADE,
    position       INTEGER NOT NULL,
    host           TEXT NOT NULL,
    port           INTEGER NOT NULL,
    port_end       INTEGER,
    priority       INTEGER NOT NULL,
    proxy_protocol TEXT,
    PRIMARY KEY (rule_id, position)
);

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          TEXT NOT NULL,             -- RFC 3339 UTC, fixed width: sorts as text
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT,
    outcome     TEXT NOT NULL,             -- ok | error
    error_code  TEXT,
    details     TEXT                       -- JSON object or NULL
);
"""

# v2: indexes for the lookups on every request (port slots, audit ranges, tokens).
_V2 = """
CREATE INDEX rules_by_slot ON rules (client_id, protocol, listen_start);
CREATE INDEX audit_by_ts ON audit (ts);
CREATE INDEX tokens_by_user ON tokens (user_id);
"""

# v3: edge enrollment.  A one-time code is kept only as its SHA-256, with its
# expiry and the time it was redeemed (a used code is refused, and says so).
# Client tokens live in clients.token_hash (v1); the unique index makes the
# hello's lookup an index probe and forbids two clients sharing a credential.
_V3 = """
CREATE TABLE client_enrollments (
    code_hash   TEXT PRIMARY KEY,          -- SHA-256 hex of the one-time code
    client_id   TEXT NOT NULL REFERENCES clients(client_id) ON DELETE CASCADE,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    used_at     TEXT
);
CREATE INDEX client_enrollments_by_client ON client_enrollments (client_id);
CREATE UNIQUE INDEX clients_by_token ON clients (token_hash);
"""

# v4: a (client, port) keeps the mode of its first rule for its lifetime, so the
# fallback of an SNI port records that it joined one (control.slots): with its
# SNI rules removed the port stays in SNI mode.  Databases from before this
# flag get it on the fallbacks of ports that hold an SNI rule right now.
_V4 = """
ALTER TABLE rules ADD COLUMN sni_fallback INTEGER NOT NULL DEFAULT 0;
UPDATE rules SET sni_fallback = 1
 WHERE sni_pattern IS NULL AND protocol = 'tcp' AND listen_start = listen_end
   AND state != 'draining'
   AND EXISTS (SELECT 1 FROM rules s
                WHERE s.client_id = rules.client_id AND s.protocol = 'tcp'
                  AND s.listen_start = rules.listen_start AND s.listen_end = s.listen_start
                  AND s.sni_pattern IS NOT NULL AND s.state != 'draining');
"""

# Users, roles, grants, per-user tokens and Web UI sessions (docs/users.md).
# ``users.name`` is the user id operators type (``alice``); ``users.id`` stays
# the internal key tokens, grants and sessions point at.  Roles narrow to
# superadmin | user (no shipped code ever created the other v1 role names).
# Existing rules keep owner '' (visible to superadmins only).  Tokens gain a
# name and a revocation time (a revoked token stays listed, and never works
# again); sessions keep only the SHA-256 of the cookie value.
_V_USERS = """
ALTER TABLE users ADD COLUMN display_name TEXT;
ALTER TABLE users ADD COLUMN password_hash TEXT;
ALTER TABLE users ADD COLUMN password_change_required INTEGER NOT NULL DEFAULT 0;
UPDATE users SET role = 'user' WHERE role NOT IN ('superadmin', 'user');
ALTER TABLE tokens ADD COLUMN name TEXT;
ALTER TABLE tokens ADD COLUMN revoked_at TEXT;
UPDATE tokens SET name = label WHERE name IS NULL AND label IS NOT NULL;
CREATE TABLE grants (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    client_id   TEXT NOT NULL,             -- a client_id, or '*' for every client
    port_start  INTEGER NOT NULL,
    port_end    INTEGER NOT NULL,
    protocols   TEXT NOT NULL,             -- 'tcp', 'udp' or 'tcp,udp'
    note        TEXT,
    created_at  TEXT NOT NULL
);
CREATE INDEX grants_by_user ON grants (user_id);
CREATE TABLE sessions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash    TEXT NOT NULL UNIQUE,    -- SHA-256 hex of the cookie value
    user_id       INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at    REAL NOT NULL,           -- Unix seconds: absolute expiry is counted from here
    last_seen_at  REAL NOT NULL,           -- Unix seconds: idle expiry is counted from here
    source        TEXT
);
CREATE INDEX sessions_by_user ON sessions (user_id);
CREATE INDEX rules_by_owner ON rules (owner);
"""

# Owner caps: one rate-limit envelope per (client, owner) over all of that owner's
# rules on the client.  ``owner`` is a user id as text (rules.owner), not a key
# into any users table, so this table stands on its own.
_V_OWNER_CAPS = """
CREATE TABLE owner_caps (
    client_id   TEXT NOT NULL REFERENCES clients(client_id) ON DELETE CASCADE,
    owner       TEXT NOT NULL,
    rate_limit  TEXT NOT NULL,             -- JSON object, the keys of a rule's rate_limit
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (client_id, owner)
);
"""

# Traffic history for the Web UI charts and GET /v1/traffic (control.traffic):
# per-rule byte and connection deltas in 1-minute and 1-hour buckets.  No foreign
# key to rules: the history of a removed rule stays readable until it ages out,
# and client_id/owner are copied so ?client= and ?owner= need no join.
_V_TRAFFIC = """
CREATE TABLE traffic (
    resolution  INTEGER NOT NULL,          -- bucket width in seconds: 60 or 3600
    bucket      INTEGER NOT NULL,          -- Unix seconds of the bucket start
    rule_id     INTEGER NOT NULL,
    client_id   TEXT NOT NULL,
    owner       TEXT NOT NULL DEFAULT '',
    bytes_in    INTEGER NOT NULL DEFAULT 0,
    bytes_out   INTEGER NOT NULL DEFAULT 0,
    connections INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (resolution, rule_id, bucket)
) WITHOUT ROWID;
-- covering: the dashboard's time-range reads (all rules, or by client/owner) never
-- touch the table itself
CREATE INDEX traffic_by_time ON traffic
    (resolution, bucket, rule_id, client_id, owner, bytes_in, bytes_out, connections);
"""


# Numbers stored before every boundary checked them against portunus.bounds: an
# `inf` health-check interval made GET /v1/rules answer 500 until the rule was
# removed.  Clamp into the documented range [0.1, 3600] (NaN never got stored:
# SQLite turns it into NULL and the NOT NULL constraint refused the row).
_V_HOSTILE = """
UPDATE rules SET health_check_interval_secs = 3600.0 WHERE health_check_interval_secs > 3600;
UPDATE rules SET health_check_interval_secs = 0.1 WHERE health_check_interval_secs < 0.1;
"""

# fleet: ``clients.list`` pages and counts ten thousand clients without reading
# every row: the live (not revoked) clients by id for ``total``, and by name for
# ``name_prefix`` and its count (control.fleet.client_pages).
_V_FLEET = """
CREATE INDEX clients_live ON clients (client_id) WHERE revoked_at IS NULL;
CREATE INDEX clients_live_by_name ON clients (name) WHERE revoked_at IS NULL;
"""

# Rule counters carried across restarts (portunus/control/counters.py).
_V_OPS = """
CREATE TABLE rule_counters (
    rule_id             INTEGER PRIMARY KEY REFERENCES rules(id) ON DELETE CASCADE,
    carried_bytes_in    INTEGER NOT NULL DEFAULT 0,   -- counted by earlier runs
    carried_bytes_out   INTEGER NOT NULL DEFAULT 0,
    carried_connections INTEGER NOT NULL DEFAULT 0,
    last_bytes_in       INTEGER NOT NULL DEFAULT 0,   -- counted by run, at the last snapshot
    last_bytes_out      INTEGER NOT NULL DEFAULT 0,
    last_connections    INTEGER NOT NULL DEFAULT 0,
    run                 TEXT,                         -- PORTUNUS_RUN_ID of the counting supervisor
    updated_at          TEXT NOT NULL
);
-- Per-rule idle timeout (NULL = off): connections / flows idle this long are closed.
ALTER TABLE rules ADD COLUMN idle_timeout_secs REAL;
"""

# paging: every list pages by key and counts its ``total`` from an index, never by
# reading every row (issue: ten thousand rules, a thousand users).  ``rules.list``
# filters by client, owner (``rules_by_owner``), state and protocol, in id order:
# an index on one column also holds the rowid, so ``col = ? AND id > ? ORDER BY id``
# is one index range.  Grants list by user (``grants_by_user``) or client; users by
# role and user id (``users.name`` is UNIQUE, so already indexed).  ``?client=NAME``
# resolves revoked clients too, which the live-only ``clients_live_by_name`` cannot
# answer: ``clients_by_name`` keeps that lookup an index probe with 10,000 clients.
_V_PAGING = """
CREATE INDEX IF NOT EXISTS rules_by_client ON rules (client_id);
CREATE INDEX IF NOT EXISTS rules_by_state ON rules (state);
CREATE INDEX IF NOT EXISTS rules_by_protocol ON rules (protocol);
CREATE INDEX IF NOT EXISTS grants_by_client ON grants (client_id);
CREATE INDEX IF NOT EXISTS users_by_role ON users (role, name);
CREATE INDEX IF NOT EXISTS clients_by_name ON clients (name);
"""

MIGRATIONS: list[str] = [
    _V1,
    _V2,
    _V3,
    _V4,
    _V_USERS,
    _V_OWNER_CAPS,
    _V_TRAFFIC,
    _V_HOSTILE,
    _V_FLEET,
    _V_OPS,
    _V_PAGING,
]
LATEST = len(MIGRATIONS)


class SchemaTooNew(PortunusError):
    """The database was written by a newer Portunus; refuse rather than corrupt it."""

    def __init__(self, db_path: str, found: int, known: int | None = None) -> None:
        known = LATEST if known is None else known
        super().__init__(
            "schema_too_new",
            f"{db_path} has schema version {found} but this Portunus knows only up to "
            f"version {known}; install the newer Portunus that wrote it, or restore a backup",
            found=found,
            known=known,
        )


def format_ts(when: datetime) -> str:
    """RFC 3339 UTC with milliseconds, fixed width so text order is time order."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return format_ts(datetime.now(UTC))


def connect_sync(db_path: str) -> sqlite3.Connection:
    """A plain sqlite3 connection with the pragmas every Portunus connection uses."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    return conn


def split_statements(script: str) -> list[str]:
    """Split a script at statement ends (``sqlite3.complete_statement`` knows about
    quotes and triggers).  ``executescript`` would commit our transaction first."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip() and not buf.strip().startswith("--"):
        out.append(buf.strip())
    return out


def current_version(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if row is None:
        return 0
    got = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(got[0]) if got else 0


def migrate(conn: sqlite3.Connection, db_path: str, target: int | None = None) -> int:
    """Bring the schema to ``target`` (default: latest); return the version reached.

    Raises ``SchemaTooNew`` when the database is ahead of this code.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = current_version(conn)
        if version > LATEST:
            raise SchemaTooNew(db_path, version)
        if version == 0:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        now = utc_now()
        for v in range(version, LATEST if target is None else min(target, LATEST)):
            for stmt in split_statements(MIGRATIONS[v]):
                conn.execute(stmt, {"now": now} if ":now" in stmt else {})
            conn.execute("UPDATE schema_version SET version = ?", (v + 1,))
            version = v + 1
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version
