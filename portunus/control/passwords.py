"""Passwords and user ids: Argon2id at rest, checked off the event loop.

Argon2id (argon2-cffi, RFC 9106 low-memory profile: 64 MiB, 3 passes) costs
~0.1-0.3 s of one core per hash, so every hash and verify runs in a worker
thread: the control process keeps answering the data plane meanwhile.  A login
for an unknown user verifies against a dummy hash, so the answer takes as long
as for a wrong password and does not tell which user ids exist.  Passwords are
never logged, audited or echoed in an error.
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from portunus.errors import ValidationError

PASSWORD_MIN_BYTES = 12
PASSWORD_MAX_BYTES = 1024
DISPLAY_NAME_MAX = 64
USER_ID = re.compile(r"[a-z][a-z0-9_-]{0,31}")

_hasher = PasswordHasher()  # argon2-cffi's default is Argon2id (RFC 9106 low-memory)


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random password, made once, for the unknown-user path."""
    return _hasher.hash(secrets.token_urlsafe(24))


def validate_user_id(value: object) -> str:
    if not isinstance(value, str) or not USER_ID.fullmatch(value):
        raise ValidationError(
            "validation.user_id",
            "user id must be a lower-case letter followed by up to 31 lower-case letters, digits, _ or -",
            field="user_id",
        )
    return value


def validate_display_name(value: object) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= DISPLAY_NAME_MAX
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise ValidationError(
            "validation.display_name",
            f"display_name must be 1-{DISPLAY_NAME_MAX} characters without control characters",
            field="display_name",
        )
    return value


def validate_password(value: object, field: str = "password") -> str:
    """12-1024 bytes of UTF-8; the message never contains the password."""
    if not isinstance(value, str):
        raise ValidationError("validation.password", f"{field} must be a string", field=field)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size < PASSWORD_MIN_BYTES:
        raise ValidationError(
            "validation.password_too_short",
            f"{field} must be at least {PASSWORD_MIN_BYTES} bytes",
            field=field,
        )
    if size > PASSWORD_MAX_BYTES:
        raise ValidationError(
            "validation.password_too_long",
            f"{field} must be at most {PASSWORD_MAX_BYTES} bytes",
            field=field,
        )
    return value


def temporary_password() -> str:
    """A one-time password a new user must change at first login (~120 bits)."""
    return secrets.token_urlsafe(15)


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(stored: str | None, password: str) -> bool:
    """Constant work whether or not there is a stored hash (unknown user, no password)."""
    if stored is None:
        await asyncio.to_thread(lambda: _verify(_dummy_hash(), password))
        return False
    return await asyncio.to_thread(_verify, stored, password)
