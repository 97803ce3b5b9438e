"""Web UI sessions and first-run setup (control process).

``login`` checks a password (Argon2id, off the loop), throttled per (user id,
source address), and mints a session token; only its SHA-256 is stored and the
web process hands the token to the browser as an HttpOnly cookie.  A wrong
password and an unknown user both answer ``invalid_login`` after the same work.

First run: while no superadmin has a password, ``serve`` writes a one-time
token to ``<data-dir>/setup.token`` (0600) and prints the setup link;
``setup`` redeems it (constant-time compare, 30 minutes from the file's
mtime) to create the first superadmin with a password, deletes the file, and
logs the new superadmin in.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from portunus.config import Settings
from portunus.control.auth import SESSION_IDLE_SECS, SESSION_MAX_SECS, Principal
from portunus.control.identity import hash_token
from portunus.control.passwords import (
    PASSWORD_MAX_BYTES,
    hash_password,
    validate_display_name,
    validate_password,
    validate_user_id,
    verify_password,
)
from portunus.control.store import Store, utc_now, write_audit
from portunus.control.store import users as users_db
from portunus.control.throttle import LoginThrottle
from portunus.errors import PortunusError, ValidationError

SETUP_TOKEN_FILE = "setup.token"
SETUP_VALID_SECS = 30 * 60.0
_SOURCE_MAX = 64


def bounded(value: object, limit: int = 64) -> str:
    """A caller-supplied string fit for an audit row: printable and short."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def setup_token_path(settings: Settings) -> str:
    return os.path.join(settings.data_dir, SETUP_TOKEN_FILE)


def remove_setup_token(settings: Settings) -> None:
    try:
        os.unlink(setup_token_path(settings))
    except FileNotFoundError:
        pass


class SessionService:
    def __init__(
        self, store: Store, settings: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.throttle = LoginThrottle(clock)

    async def _new_session(self, db: Any, user: users_db.UserRow, source: str) -> dict[str, Any]:
        token = secrets.token_urlsafe(32)
        now = self.clock()
        await users_db.delete_expired_sessions(db, now - SESSION_IDLE_SECS, now - SESSION_MAX_SECS)
        session_id = await users_db.insert_session(db, hash_token(token), user.id, now, source)
        await write_audit(
            db,
            user.name,
            "auth.login",
            f"user:{user.name}",
            details={"session_id": session_id, "source": source},
        )
        return {
            "user_id": user.name,
            "display_name": user.display_name or user.name,
            "role": user.role,
            "password_change_required": user.password_change_required,
            "session_token": token,
            "idle_timeout_secs": int(SESSION_IDLE_SECS),
            "max_age_secs": int(SESSION_MAX_SECS),
        }

    async def _login_refused(self, user_id: str, source: str, code: str) -> None:
        """The audit row of a refused login (locked out or wrong credentials)."""
        async with self.store.write() as db:
            await write_audit(
                db,
                bounded(user_id),
                "auth.login",
                f"user:{bounded(user_id)}",
                outcome="error",
                error_code=code,
                details={"source": source},
            )

    async def login(self, params: dict[str, Any]) -> dict[str, Any]:
        user_id, password = params.get("user_id"), params.get("password")
        source = bounded(params.get("source") or "unknown", _SOURCE_MAX)
        if not isinstance(user_id, str) or not isinstance(password, str):
            raise ValidationError("validation.body", "user_id and password are required strings")
        key = (user_id[:64], source)
        try:
            self.throttle.check(key)
        except PortunusError as exc:  # a locked-out attempt is on the record too
            await self._login_refused(user_id, source, exc.code)
            raise
        async with self.store.read() as db:
            user = await users_db.find_user(db, user_id) if len(user_id) <= 64 else None
        sane = len(password.encode("utf-8", "surrogatepass")) <= PASSWORD_MAX_BYTES
        ok = await verify_password(
            user.password_hash if user and sane else None, password if sane else ""
        )
        if not ok or user is None:
            self.throttle.failure(key)
            await self._login_refused(user_id, source, "invalid_login")
            refused = PortunusError("invalid_login", "wrong user id or password")
            refused.audited = True  # recorded above, once
            raise refused
        self.throttle.success(key)
        async with self.store.write() as db:
            return await self._new_session(db, user, source)

    async def logout(self, who: Principal) -> dict[str, Any]:
        async with self.store.write() as db:
            if who.session_id is not None:
                await users_db.delete_session(db, who.session_id)
            await write_audit(
                db,
                who.user,
                "auth.logout",
                f"user:{who.user}",
                details={"session_id": who.session_id},
            )
        return {}

    async def me(self, who: Principal) -> dict[str, Any]:
        async with self.store.read() as db:
            user = await users_db.user_by_id(db, who.user_id)
        if user is None:
            raise PortunusError("unauthenticated", "this identity no longer exists")
        j = user.to_json()
        return {k: j[k] for k in ("user_id", "display_name", "role", "password_change_required")}

    async def change_own_password(self, who: Principal, params: dict[str, Any]) -> dict[str, Any]:
        current = params.get("current_password")
        new = validate_password(params.get("new_password"), "new_password")
        key = (who.user, f"password:{who.user}")
        self.throttle.check(key)
        async with self.store.read() as db:
            user = await users_db.user_by_id(db, who.user_id)
        if (
            user is None
            or not isinstance(current, str)
            or not await verify_password(user.password_hash, current)
        ):
            self.throttle.failure(key)
            async with self.store.write() as db:
                await write_audit(
                    db,
                    who.user,
                    "user.password",
                    f"user:{who.user}",
                    outcome="error",
                    error_code="validation.current_password",
                )
            raise ValidationError(
                "validation.current_password",
                "the current password is wrong",
                field="current_password",
            )
        self.throttle.success(key)
        digest = await hash_password(new)
        async with self.store.write() as db:
            await users_db.set_password(db, user.id, digest, change_required=False)
            revoked = await users_db.delete_sessions_of(db, user.id, keep=who.session_id)
            await write_audit(
                db,
                who.user,
                "user.password",
                f"user:{who.user}",
                details={"self": True, "revoked_sessions": revoked},
            )
        return {}

    def _check_setup_token(self, token: object) -> None:
        path = setup_token_path(self.settings)
        try:
            with open(path, encoding="utf-8") as f:
                expected = f.read().strip()
            born = os.stat(path).st_mtime
        except (FileNotFoundError, UnicodeDecodeError):
            raise PortunusError(
                "invalid_setup_token", "no setup link is pending; restart serve for one"
            ) from None
        if (
            not isinstance(token, str)
            or not expected
            or not hmac.compare_digest(token.encode(), expected.encode())
        ):
            raise PortunusError("invalid_setup_token", "the setup token is not valid")
        if self.clock() - born > SETUP_VALID_SECS:
            raise PortunusError(
                "invalid_setup_token",
                "the setup link expired (30 minutes); restart serve for a new one",
            )

    async def setup(self, params: dict[str, Any]) -> dict[str, Any]:
        """Redeem the first-run token: create the first superadmin with a password."""
        try:
            async with self.store.read() as db:
                done = await users_db.superadmin_has_password(db)
            if done:
                raise PortunusError(
                    "conflict.setup_done",
                    "a superadmin with a password exists already; log in instead",
                )
            self._check_setup_token(params.get("token"))
            user_id = validate_user_id(params.get("user_id"))
            display = validate_display_name(params.get("display_name"))
            password = validate_password(params.get("password"))
            digest = await hash_password(password)
            async with self.store.write() as db:
                if await users_db.find_user(db, user_id) is not None:
                    raise PortunusError(
                        "user_exists", f"user {user_id} exists already", user_id=user_id
                    )
                new_id = await users_db.insert_user(
                    db, user_id, "superadmin", display, digest, False, utc_now()
                )
                await write_audit(
                    db,
                    "setup",
                    "user.add",
                    f"user:{user_id}",
                    details={"role": "superadmin", "via": "setup"},
                )
                user = await users_db.user_by_id(db, new_id)
                assert user is not None
                out = await self._new_session(
                    db, user, bounded(params.get("source") or "unknown", _SOURCE_MAX)
                )
        except PortunusError as exc:
            async with self.store.write() as db:
                await write_audit(
                    db, "anonymous", "auth.setup", None, outcome="error", error_code=exc.code
                )
            exc.audited = True
            raise
        remove_setup_token(self.settings)
        return out
