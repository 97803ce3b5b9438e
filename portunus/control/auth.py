"""Bearer tokens: SHA-256 at rest, constant-time comparison, never logged.

A token is looked up by its hash (an index probe, so the lookup time does not
depend on how much of a guess is right) and the stored hash is then compared
with ``hmac.compare_digest`` as a second line.  Logs and audit rows name the
token id and the user, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from pathlib import Path

from portunus.config import Settings
from portunus.control.store import Store, accounts, utc_now, write_audit
from portunus.errors import PortunusError

ROLES = ("superadmin", "admin", "operator", "viewer")
MAX_TOKEN_LEN = 512
# last_used_at is telemetry: write it at most once a minute per token, not per request.
TOUCH_INTERVAL_SECS = 60.0
_USER_NAME = re.compile(r"[A-Za-z0-9_.@\-]{1,64}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def validate_user_name(name: str) -> str:
    if not isinstance(name, str) or not _USER_NAME.fullmatch(name.strip()):
        raise PortunusError(
            "validation.name",
            "user name must be 1-64 letters, digits or _ . @ -",
            field="name",
        )
    return name.strip()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the user behind a token."""

    user_id: int
    user: str
    role: str
    token_id: int


class Authenticator:
    """Turns a bearer token into a ``Principal`` (in the control process)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._touched: dict[int, float] = {}

    async def authenticate(self, token: object) -> Principal:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LEN:
            raise PortunusError("unauthenticated", "a bearer token is required")
        digest = hash_token(token)
        async with self.store.read() as db:
            row = await accounts.find_token(db, digest)
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            raise PortunusError("unauthenticated", "the token is not valid")
        now = time.monotonic()
        if now - self._touched.get(row.token_id, -TOUCH_INTERVAL_SECS) >= TOUCH_INTERVAL_SECS:
            self._touched[row.token_id] = now
            async with self.store.write() as db:
                await accounts.touch_token(db, row.token_id, utc_now())
        return Principal(row.user_id, row.user, row.role, row.token_id)


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
                db, "system", "token.operator_install", f"user:{accounts.OPERATOR_USER}",
                details={"token_id": token_id},
            )
    return token_id
