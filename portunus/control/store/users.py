"""User, token, grant and session rows (schema ``_V_USERS``).

``users.name`` is the user id operators type; ``users.id`` is the internal key
tokens, grants and sessions point at (they go with the user: ON DELETE CASCADE).
Functions take the connection of ``Store.read()``/``Store.write()`` so a change
and its audit row share one transaction.  Secrets never reach this module in
the clear: tokens and sessions arrive as SHA-256 hex, passwords as Argon2id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiosqlite

from portunus.control.store.accounts import OPERATOR_USER
from portunus.errors import PortunusError


@dataclass(frozen=True, slots=True)
class UserRow:
    id: int
    name: str
    role: str
    display_name: str | None
    password_hash: str | None
    password_change_required: bool
    created_at: str

    def to_json(self) -> dict[str, Any]:
        """The contract's user shape; never the password hash."""
        return {
            "user_id": self.name,
            "display_name": self.display_name or self.name,
            "role": self.role,
            "password_change_required": self.password_change_required,
            "has_password": self.password_hash is not None,
            "builtin": self.name == OPERATOR_USER,
            "created_at": self.created_at,
        }


def _user(row: aiosqlite.Row) -> UserRow:
    return UserRow(
        row["id"],
        row["name"],
        row["role"],
        row["display_name"],
        row["password_hash"],
        bool(row["password_change_required"]),
        row["created_at"],
    )


async def find_user(db: aiosqlite.Connection, name: str) -> UserRow | None:
    async with db.execute("SELECT * FROM users WHERE name = ?", (name,)) as cur:
        row = await cur.fetchone()
    return _user(row) if row is not None else None


async def user_by_id(db: aiosqlite.Connection, user_id: int) -> UserRow | None:
    async with db.execute("SELECT * FROM users WHERE id = ?", (user_id,)) as cur:
        row = await cur.fetchone()
    return _user(row) if row is not None else None


async def require_user(db: aiosqlite.Connection, name: str) -> UserRow:
    found = await find_user(db, name)
    if found is None:
        raise PortunusError(
            "user_not_found", f"no user {name!r}; `user-list` shows the users", user_id=name
        )
    return found


async def insert_user(
    db: aiosqlite.Connection,
    name: str,
    role: str,
    display_name: str | None,
    password_hash: str | None,
    change_required: bool,
    now: str,
) -> int:
    cur = await db.execute(
        "INSERT INTO users (name, role, created_at, display_name, password_hash, password_change_required) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (name, role, now, display_name, password_hash, int(change_required)),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


async def set_password(
    db: aiosqlite.Connection, user_id: int, password_hash: str, change_required: bool
) -> None:
    await db.execute(
        "UPDATE users SET password_hash = ?, password_change_required = ? WHERE id = ?",
        (password_hash, int(change_required), user_id),
    )


async def delete_user(db: aiosqlite.Connection, user_id: int) -> None:
    await db.execute("DELETE FROM users WHERE id = ?", (user_id,))


async def count_superadmins(db: aiosqlite.Connection, except_id: int | None = None) -> int:
    """Superadmins who are people: the built-in ``operator`` holder does not count."""
    async with db.execute(
        "SELECT count(*) FROM users WHERE role = 'superadmin' AND name != ? AND id != ?",
        (OPERATOR_USER, except_id if except_id is not None else -1),
    ) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def superadmin_has_password(db: aiosqlite.Connection) -> bool:
    async with db.execute(
        "SELECT 1 FROM users WHERE role = 'superadmin' AND password_hash IS NOT NULL LIMIT 1"
    ) as cur:
        return await cur.fetchone() is not None


# ------------------------------------------------------------------ tokens


def token_json(row: aiosqlite.Row) -> dict[str, Any]:
    return {
        "token_id": row["id"],
        "user_id": row["user_name"],
        "name": row["name"],
        "created_at": row["created_at"],
        "last_used_at": row["last_used_at"],
        "revoked_at": row["revoked_at"],
    }


_TOKENS = "SELECT t.*, u.name AS user_name FROM tokens t JOIN users u ON u.id = t.user_id"


async def insert_token(
    db: aiosqlite.Connection, user_id: int, token_hash: str, name: str | None, now: str
) -> int:
    cur = await db.execute(
        "INSERT INTO tokens (user_id, token_hash, name, created_at) VALUES (?, ?, ?, ?)",
        (user_id, token_hash, name, now),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


async def list_tokens(db: aiosqlite.Connection, user_id: int | None = None) -> list[dict[str, Any]]:
    where, args = ("WHERE t.user_id = ?", (user_id,)) if user_id is not None else ("", ())
    async with db.execute(f"{_TOKENS} {where} ORDER BY t.id", args) as cur:
        return [token_json(r) for r in await cur.fetchall()]


async def get_token(db: aiosqlite.Connection, token_id: int) -> dict[str, Any] | None:
    async with db.execute(f"{_TOKENS} WHERE t.id = ?", (token_id,)) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    out = token_json(row)
    out["label"] = row["label"]
    return out


async def revoke_token(db: aiosqlite.Connection, token_id: int, now: str) -> None:
    await db.execute(
        "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, token_id)
    )


async def live_token_ids(db: aiosqlite.Connection, user_id: int) -> list[int]:
    async with db.execute(
        "SELECT id FROM tokens WHERE user_id = ? AND revoked_at IS NULL ORDER BY id", (user_id,)
    ) as cur:
        return [r[0] for r in await cur.fetchall()]


# ------------------------------------------------------------------ grants


@dataclass(frozen=True, slots=True)
class GrantRow:
    id: int
    user_id: int
    user: str
    client_id: str  # '*' = every client
    client_name: str | None
    port_start: int
    port_end: int
    protocols: tuple[str, ...]
    note: str | None
    created_at: str

    def covers_client(self, client_id: str) -> bool:
        return self.client_id == "*" or self.client_id == client_id

    def covers(self, client_id: str, protocol: str, lo: int, hi: int) -> bool:
        return (
            self.covers_client(client_id)
            and protocol in self.protocols
            and self.port_start <= lo
            and hi <= self.port_end
        )

    def ports(self) -> str:
        return (
            str(self.port_start)
            if self.port_start == self.port_end
            else f"{self.port_start}-{self.port_end}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "grant_id": self.id,
            "user_id": self.user,
            "client": "*" if self.client_id == "*" else (self.client_name or self.client_id),
            "client_id": self.client_id,
            "listen_port_start": self.port_start,
            "listen_port_end": self.port_end,
            "protocols": list(self.protocols),
            "note": self.note,
            "created_at": self.created_at,
        }


_GRANTS = (
    "SELECT g.*, u.name AS user_name, c.name AS client_name FROM grants g "
    "JOIN users u ON u.id = g.user_id LEFT JOIN clients c ON c.client_id = g.client_id"
)


def _grant(row: aiosqlite.Row) -> GrantRow:
    return GrantRow(
        row["id"],
        row["user_id"],
        row["user_name"],
        row["client_id"],
        row["client_name"],
        row["port_start"],
        row["port_end"],
        tuple(row["protocols"].split(",")),
        row["note"],
        row["created_at"],
    )


async def insert_grant(
    db: aiosqlite.Connection,
    user_id: int,
    client_id: str,
    lo: int,
    hi: int,
    protocols: tuple[str, ...],
    note: str | None,
    now: str,
) -> int:
    cur = await db.execute(
        "INSERT INTO grants (user_id, client_id, port_start, port_end, protocols, note, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (user_id, client_id, lo, hi, ",".join(protocols), note, now),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


async def list_grants(db: aiosqlite.Connection, user_id: int | None = None) -> list[GrantRow]:
    where, args = ("WHERE g.user_id = ?", (user_id,)) if user_id is not None else ("", ())
    async with db.execute(f"{_GRANTS} {where} ORDER BY g.id", args) as cur:
        return [_grant(r) for r in await cur.fetchall()]


async def get_grant(db: aiosqlite.Connection, grant_id: int) -> GrantRow | None:
    async with db.execute(f"{_GRANTS} WHERE g.id = ?", (grant_id,)) as cur:
        row = await cur.fetchone()
    return _grant(row) if row is not None else None


async def delete_grant(db: aiosqlite.Connection, grant_id: int) -> None:
    await db.execute("DELETE FROM grants WHERE id = ?", (grant_id,))


# ------------------------------------------------------------------ sessions


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: int
    user_id: int
    created_at: float
    last_seen_at: float


async def insert_session(
    db: aiosqlite.Connection, token_hash: str, user_id: int, now: float, source: str | None
) -> int:
    cur = await db.execute(
        "INSERT INTO sessions (token_hash, user_id, created_at, last_seen_at, source) VALUES (?, ?, ?, ?, ?)",
        (token_hash, user_id, now, now, source),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


async def find_session(db: aiosqlite.Connection, token_hash: str) -> tuple[SessionRow, str] | None:
    """The session and its stored hash (compared again in constant time by the caller)."""
    async with db.execute("SELECT * FROM sessions WHERE token_hash = ?", (token_hash,)) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    return SessionRow(row["id"], row["user_id"], row["created_at"], row["last_seen_at"]), row[
        "token_hash"
    ]


async def touch_session(db: aiosqlite.Connection, session_id: int, now: float) -> None:
    await db.execute("UPDATE sessions SET last_seen_at = ? WHERE id = ?", (now, session_id))


async def delete_session(db: aiosqlite.Connection, session_id: int) -> None:
    await db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))


async def delete_sessions_of(
    db: aiosqlite.Connection, user_id: int, keep: int | None = None
) -> int:
    cur = await db.execute(
        "DELETE FROM sessions WHERE user_id = ? AND id != ?",
        (user_id, keep if keep is not None else -1),
    )
    return cur.rowcount or 0


async def delete_expired_sessions(
    db: aiosqlite.Connection, idle_before: float, created_before: float
) -> None:
    await db.execute(
        "DELETE FROM sessions WHERE last_seen_at < ? OR created_at < ?",
        (idle_before, created_before),
    )
