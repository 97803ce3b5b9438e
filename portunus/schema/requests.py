"""The other request bodies: clients, users, tokens, grants, sessions.

Each maps one ``POST``/``PATCH`` route (and its Web UI form); the routes read them
through ``portunus.web.routes.bodies.read_json`` by the struct's name.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from portunus.bounds import ENROLL_TTL, MAX_ADDRESS_LEN, MAX_NAME_LEN
from portunus.schema.types import about, text, within

ClientName = Annotated[
    str,
    text(
        "validation.name",
        MAX_NAME_LEN,
        description="Free-form client name; `local` is reserved for the server itself.",
    ),
]
UserId = Annotated[
    str,
    text(
        "validation.user_id",
        64,
        description="New ids: a lower-case letter, then up to 31 of a-z 0-9 _ -.",
    ),
]
Password = Annotated[
    str,
    text(
        "validation.password",
        4096,
        description="12-1024 bytes (UTF-8); stored as Argon2id, never echoed.",
    ),
]
DisplayName = Annotated[str, text("validation.display_name", 64)]
Address = Annotated[
    str,
    text(
        "validation.address",
        MAX_ADDRESS_LEN,
        description="Host the client dials (default: the host of control_listen, else the "
        "server's FQDN).",
    ),
]
GrantPort = Annotated[int, Meta(ge=1, le=65535), about(None, "validation.port_range")]


class ClientEnrollmentBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: ClientName
    address: Address | UnsetType = UNSET
    ttl_secs: Annotated[int, within(ENROLL_TTL, "validation.ttl_secs")] = 600

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {
        "description": "Enroll a new edge client: mints a one-time code valid for ttl_secs."
    }


class ClientRename(Struct, forbid_unknown_fields=True):
    name: ClientName

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {}


class LoginBody(Struct, forbid_unknown_fields=True):
    user_id: UserId
    password: Password

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {"description": "Log in."}


class SetupBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    token: Annotated[str, text("validation.token", 512)]
    user_id: UserId
    password: Password
    display_name: DisplayName | UnsetType = UNSET

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {
        "description": "Redeem the first-run setup token: creates the first superadmin."
    }


class OwnPasswordBody(Struct, forbid_unknown_fields=True):
    current_password: Password
    new_password: Password

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {"description": "Change your own password."}


class UserBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    user_id: UserId
    display_name: DisplayName | UnsetType = UNSET
    role: Annotated[Literal["superadmin", "user"], about(None, "validation.role")] = "user"
    password: Password | UnsetType = UNSET

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {
        "description": "A new user; without a password a temporary one is answered once."
    }


class PasswordBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    password: Password | UnsetType = UNSET

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {
        "description": "Set a user's password; without one a temporary password is answered once."
    }


class TokenBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, text("validation.name", 64)] | UnsetType = UNSET

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {"description": "A new API token for the user."}


class GrantBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    user_id: UserId
    client: Annotated[
        str,
        text("validation.client", 64, description="Client name or id, or `*` for every client."),
    ]
    listen_port_start: GrantPort
    listen_port_end: GrantPort
    protocols: (
        Annotated[
            list[Literal["tcp", "udp"]],
            Meta(min_length=1, max_length=2),
            about(None, "validation.protocols"),
        ]
        | UnsetType
    ) = UNSET
    note: (
        Annotated[Annotated[str, Meta(max_length=256)] | None, about(None, "validation.note")]
        | UnsetType
    ) = UNSET

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {
        "description": "Allow a user to push rules on a client, protocol and listen-port range."
    }
