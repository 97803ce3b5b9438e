"""Enrollment codes and client tokens in state.db (docs/edge.md "Enrollment").

Both secrets are stored only as SHA-256 hex and found by an index probe on the
hash, then compared with ``hmac.compare_digest`` (the same scheme as operator
tokens in ``control.auth``).  A code is redeemed, and the token set, in one
transaction: two clients racing with one code cannot both get a token.
"""

from __future__ import annotations

import hmac
import secrets
import socket
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiosqlite

from portunus.bounds import MAX_NAME_LEN
from portunus.control.identity import hash_token
from portunus.control.store.accounts import LOCAL_CLIENT_ID, ClientRow, new_ulid
from portunus.control.store.migrations import format_ts, utc_now
from portunus.errors import PortunusError, ValidationError
from portunus.rules import validate_host

MAX_SECRET_LEN = 512


class EnrollmentInvalid(PortunusError):
    """A code that cannot be redeemed; the message says why (unknown, used, expired)."""

    def __init__(self, message: str) -> None:
        super().__init__("enrollment_invalid", message)


def validate_client_name(raw: object) -> str:
    """Free-form, but one line of printable text, 1-64 characters, and not the
    reserved ``local`` (the server's own node)."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValidationError("validation.name", "name must be a non-empty string", field="name")
    name = raw.strip()
    if len(name) > MAX_NAME_LEN:
        raise ValidationError(
            "validation.name", f"name must be at most {MAX_NAME_LEN} characters", field="name"
        )
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise ValidationError(
            "validation.name", "name must not contain control characters", field="name"
        )
    if name == LOCAL_CLIENT_ID:
        raise ValidationError(
            "validation.name",
            "`local` is the reserved name of the server's own node; pick another",
            field="name",
        )
    return name


def advertised_host(address: object, listen_host: str) -> str:
    """HOST of the URI: ``address`` if given, else the host of control_listen
    unless it is a wildcard, else this machine's FQDN."""
    if address is not None:
        if not isinstance(address, str):
            raise ValidationError(
                "validation.address", "address must be a host name or IP", field="address"
            )
        try:
            return validate_host(address, "address")
        except ValidationError as exc:
            raise ValidationError("validation.address", exc.message, field="address") from None
    if listen_host not in ("0.0.0.0", "::", ""):
        return listen_host
    return socket.getfqdn()


def build_uri(host: str, port: int, code: str, fingerprint: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"portunus://{shown}:{port}/enroll?code={code}&fp={fingerprint}"


def enroll_command(uri: str) -> str:
    return f"portunus-client enroll '{uri}'"


@dataclass(frozen=True, slots=True)
class NewEnrollment:
    client: ClientRow
    code: str
    expires_at: str


async def create_enrollment(db: aiosqlite.Connection, name: str, ttl_secs: int) -> NewEnrollment:
    """Register the client and its one-time code (inside the caller's transaction)."""
    now = datetime.now(UTC)
    client = ClientRow(new_ulid(), name, format_ts(now), None)
    code = secrets.token_urlsafe(24)
    expires_at = format_ts(now + timedelta(seconds=ttl_secs))
    await db.execute(
        "INSERT INTO clients (client_id, name, created_at) VALUES (?, ?, ?)",
        (client.client_id, client.name, client.created_at),
    )
    await db.execute(
        "INSERT INTO client_enrollments (code_hash, client_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
        (hash_token(code), client.client_id, client.created_at, expires_at),
    )
    return NewEnrollment(client, code, expires_at)


async def redeem(db: aiosqlite.Connection, code: object) -> tuple[ClientRow, str]:
    """Spend ``code`` and give its client a fresh token; return ``(client, token)``.

    Raises ``EnrollmentInvalid`` naming the reason; nothing is written then.
    """
    if not isinstance(code, str) or not code or len(code) > MAX_SECRET_LEN:
        raise EnrollmentInvalid("the enrollment code is missing or malformed")
    digest = hash_token(code)
    async with db.execute(
        "SELECT e.code_hash, e.expires_at, e.used_at, c.client_id, c.name, c.created_at, c.revoked_at "
        "FROM client_enrollments e JOIN clients c ON c.client_id = e.client_id WHERE e.code_hash = ?",
        (digest,),
    ) as cur:
        row = await cur.fetchone()
    if row is None or not hmac.compare_digest(row["code_hash"], digest):
        raise EnrollmentInvalid(
            "unknown enrollment code; mint a new one with `portunus-server enroll-client`"
        )
    client = ClientRow(row["client_id"], row["name"], row["created_at"], row["revoked_at"])
    if row["used_at"] is not None:
        raise EnrollmentInvalid(
            f"this enrollment code was already used at {row['used_at']}; mint a new one "
            "with `portunus-server enroll-client`"
        )
    now = utc_now()
    if row["expires_at"] <= now:  # fixed-width RFC 3339 UTC: text order is time order
        raise EnrollmentInvalid(
            f"this enrollment code expired at {row['expires_at']}; mint a new one "
            "with `portunus-server enroll-client`"
        )
    if client.revoked_at is not None:
        raise EnrollmentInvalid(
            f"client {client.name} ({client.client_id}) was revoked at {client.revoked_at}"
        )
    token = secrets.token_urlsafe(32)
    await db.execute("UPDATE client_enrollments SET used_at = ? WHERE code_hash = ?", (now, digest))
    await db.execute(
        "UPDATE clients SET token_hash = ? WHERE client_id = ?",
        (hash_token(token), client.client_id),
    )
    return client, token


async def client_for_token(db: aiosqlite.Connection, token: object) -> ClientRow | None:
    """The client holding ``token`` (revoked ones included: the caller says so)."""
    if not isinstance(token, str) or not token or len(token) > MAX_SECRET_LEN:
        return None
    digest = hash_token(token)
    async with db.execute(
        "SELECT client_id, name, created_at, revoked_at, token_hash FROM clients "
        "WHERE token_hash = ? AND client_id != ?",
        (digest, LOCAL_CLIENT_ID),
    ) as cur:
        row = await cur.fetchone()
    if row is None or not hmac.compare_digest(row["token_hash"], digest):
        return None
    return ClientRow(row["client_id"], row["name"], row["created_at"], row["revoked_at"])
