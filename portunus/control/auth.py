"""Bearer tokens and Web UI sessions: SHA-256 at rest, constant-time
comparison, never logged.

A token is looked up by its hash (an index probe, so the lookup time does not
depend on how much of a guess is right) and the stored hash is then compared
with ``hmac.compare_digest`` as a second line.  Logs and audit rows name the
token id and the user, never the token.

Every request reads its token or session row again: a revoked token or a
logged-out session fails on the very next request.  Only the ``last_used_at``
/ ``last_seen_at`` writes are rate-limited (once a minute per token or session);
the idle expiry of a session is therefore exact to that minute.  The clock is
injectable so expiry is testable without waiting eight hours.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from portunus.config import Settings
from portunus.control.identity import hash_token
from portunus.control.store import Store, accounts, utc_now, write_audit
from portunus.control.store import users as users_db
from portunus.errors import PortunusError

MAX_TOKEN_LEN = 512
SESSION_IDLE_SECS = 8 * 3600.0
SESSION_MAX_SECS = 7 * 24 * 3600.0
# last_used_at is telemetry: write it at most once a minute per token, not per request.
TOUCH_INTERVAL_SECS = 60.0


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the user behind a token."""

    user_id: int
    user: str
    role: str
    token_id: int
    session_id: int | None = None
    password_change_required: bool = False

    @property
    def is_superadmin(self) -> bool:
        return self.role == "superadmin"

    @property
    def via_session(self) -> bool:
        return self.session_id is not None


def _valid(token: object) -> bool:
    return isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_LEN


class Authenticator:
    """Turns a bearer token or a session token into a ``Principal`` (in the
    control process).  ``clock`` gives Unix seconds (sessions expire by it)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._touched: dict[int, float] = {}

    async def authenticate(self, token: object, session: object = None) -> Principal:
        """A bearer token wins over a session when both are sent."""
        if _valid(token):
            assert isinstance(token, str)
            return await self._token(token)
        if _valid(session):
            assert isinstance(session, str)
            return await self._session(session)
        raise PortunusError("unauthenticated", "a bearer token or a login session is required")

    async def _token(self, token: str) -> Principal:
        digest = hash_token(token)
        async with self.store.read() as db:
            row = await accounts.find_token(db, digest)
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            raise PortunusError("unauthenticated", "the token is not valid (unknown or revoked)")
        now = time.monotonic()
        if now - self._touched.get(row.token_id, -TOUCH_INTERVAL_SECS) >= TOUCH_INTERVAL_SECS:
            self._touched[row.token_id] = now
            async with self.store.write() as db:
                await accounts.touch_token(db, row.token_id, utc_now())
        return Principal(
            row.user_id,
            row.user,
            row.role,
            row.token_id,
            password_change_required=row.password_change_required,
        )

    async def _session(self, session: str) -> Principal:
        digest = hash_token(session)
        now = self.clock()
        async with self.store.read() as db:
            found = await users_db.find_session(db, digest)
            user = await users_db.user_by_id(db, found[0].user_id) if found is not None else None
        if found is None or user is None or not hmac.compare_digest(found[1], digest):
            raise PortunusError("unauthenticated", "the login session is not valid; log in again")
        row = found[0]
        if now - row.last_seen_at > SESSION_IDLE_SECS or now - row.created_at > SESSION_MAX_SECS:
            async with self.store.write() as db:
                await users_db.delete_session(db, row.id)
            raise PortunusError("unauthenticated", "the login session expired; log in again")
        if now - row.last_seen_at >= TOUCH_INTERVAL_SECS:
            async with self.store.write() as db:
                await users_db.touch_session(db, row.id, now)
        return Principal(
            user.id,
            user.name,
            user.role,
            0,
            session_id=row.id,
            password_change_required=user.password_change_required,
        )


def read_operator_token(settings: Settings) -> str | None:
    """``operator_token`` from server.toml, else ``<data_dir>/operator.token``
    (which ``serve`` creates 0600 before forking the control process)."""
    if settings.operator_token:
        return settings.operator_token.strip() or None
    try:
        text = Path(settings.token_path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


async def install_operator_token(store: Store, token: str) -> int:
    """Upsert the operator token as the superadmin token of user ``operator``;
    return its token id.  Audited only when it actually changed."""
    async with store.write() as db:
        token_id, changed = await accounts.upsert_operator_token(db, hash_token(token))
        if changed:
            await write_audit(
                db,
                "system",
                "token.operator_install",
                f"user:{accounts.OPERATOR_USER}",
                details={"token_id": token_id},
            )
    return token_id
