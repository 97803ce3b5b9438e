"""Errors as values an operator can act on.

Every failure that crosses a process boundary (control socket, HTTP, CLI) is a
``PortunusError`` with a stable ``code`` (docs/reference/errors.md).  The HTTP status and the
CLI exit code are derived from the code in one place, here, so the CLI and the API
can never disagree about what a failure means.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from portunus.exitcodes import ServiceExit

# CLI exit codes (docs/reference/exit-codes.md).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PREFLIGHT = 3
EXIT_UNAUTHENTICATED = 4
EXIT_NOT_FOUND = 5
EXIT_ACTIVATION_FAILED = 6
EXIT_ACK_TIMEOUT = 7
EXIT_NOT_CONNECTED = 8
EXIT_FORBIDDEN = 9
EXIT_CONFLICT = 10
# sysexits EX_CONFIG: the database schema is newer than this code.
EXIT_SCHEMA_TOO_NEW = int(ServiceExit.CONFIG)  # the same EX_CONFIG serve exits with

# code (or code prefix ending in ".") -> (HTTP status, exit code)
_TABLE: dict[str, tuple[int, int]] = {
    "validation.body_too_large": (413, EXIT_USAGE),
    "validation.": (400, EXIT_USAGE),
    "validation": (400, EXIT_USAGE),
    "bad_request": (400, EXIT_USAGE),
    "preflight": (400, EXIT_PREFLIGHT),
    "unauthenticated": (401, EXIT_UNAUTHENTICATED),
    "forbidden": (403, EXIT_FORBIDDEN),
    "csrf": (403, EXIT_FORBIDDEN),
    "client_not_granted": (403, EXIT_FORBIDDEN),
    "port_outside_grant": (403, EXIT_FORBIDDEN),
    "protocol_not_granted": (403, EXIT_FORBIDDEN),
    "not_owner": (403, EXIT_FORBIDDEN),
    "role_required": (403, EXIT_FORBIDDEN),
    "password_change_required": (403, EXIT_FORBIDDEN),
    "csrf_failed": (403, EXIT_FORBIDDEN),
    "invalid_login": (401, EXIT_UNAUTHENTICATED),
    "invalid_setup_token": (401, EXIT_UNAUTHENTICATED),
    "user_not_found": (404, EXIT_NOT_FOUND),
    "grant_not_found": (404, EXIT_NOT_FOUND),
    "token_not_found": (404, EXIT_NOT_FOUND),
    "user_exists": (409, EXIT_CONFLICT),
    "cannot_remove_self": (409, EXIT_CONFLICT),
    "last_superadmin": (409, EXIT_CONFLICT),
    "not_found": (404, EXIT_NOT_FOUND),
    "client_not_found": (404, EXIT_NOT_FOUND),
    "rule_not_found": (404, EXIT_NOT_FOUND),
    "owner_cap_not_found": (404, EXIT_NOT_FOUND),
    "method_not_allowed": (405, EXIT_USAGE),
    "request_timeout": (408, EXIT_ERROR),
    "conflict": (409, EXIT_CONFLICT),
    "conflict.": (409, EXIT_CONFLICT),
    "port_conflict": (409, EXIT_CONFLICT),
    "ambiguous_client": (409, EXIT_CONFLICT),
    "client_not_connected": (422, EXIT_NOT_CONNECTED),
    "activation_failed": (422, EXIT_ACTIVATION_FAILED),
    "throttled": (429, EXIT_ERROR),
    "rate_limited": (429, EXIT_ERROR),
    "ack_timeout": (504, EXIT_ACK_TIMEOUT),
    "schema_too_new": (500, EXIT_SCHEMA_TOO_NEW),
    "unavailable": (503, EXIT_ERROR),
    "internal": (500, EXIT_ERROR),
}


def classify(code: str) -> tuple[int, int]:
    """Return ``(http_status, exit_code)`` for an error code."""
    if code in _TABLE:
        return _TABLE[code]
    if code.endswith("_unsupported_by_client"):
        return (422, EXIT_ERROR)
    for prefix, pair in _TABLE.items():
        if prefix.endswith(".") and code.startswith(prefix):
            return pair
    return (500, EXIT_ERROR)


class PortunusError(Exception):
    """A failure with a stable code, a message for people, and optional details."""

    # Set by a service that already wrote the refusal's audit row, so the RPC
    # dispatcher does not audit it a second time.
    audited: bool = False

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details

    @property
    def http_status(self) -> int:
        return classify(self.code)[0]

    @property
    def exit_code(self) -> int:
        return classify(self.code)[1]

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.details)
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> PortunusError:
        extra = {k: v for k, v in body.items() if k not in ("code", "message")}
        return cls(str(body.get("code", "internal")), str(body.get("message", "")), **extra)


class ValidationError(PortunusError):
    """An input that is not well-formed; ``code`` is always ``validation.*``."""

    def __init__(self, code: str, message: str, field: str | None = None, **details: Any) -> None:
        if not code.startswith("validation"):
            code = f"validation.{code}"
        if field is not None:
            details["field"] = field
        super().__init__(code, message, **details)


def reject_unknown_fields(params: Mapping[str, Any], allowed: Collection[str]) -> None:
    """Refuse a request body with a key outside ``allowed`` (typos must not pass silently).

    One check for every control verb that takes a closed set of fields, so they all
    answer ``validation.unknown_field`` alike: the sorted unknown names in the message,
    the first of them as ``field``.
    """
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValidationError(
            "validation.unknown_field",
            f"unknown field(s): {', '.join(unknown)}",
            field=unknown[0],
        )
