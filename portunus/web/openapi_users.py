"""The OpenAPI paths and response schemas of users, tokens, grants and Web UI
sessions (merged into ``portunus.web.openapi``; their request bodies are
declared in ``portunus.schema.requests``)."""

from __future__ import annotations

from typing import Any

from portunus.web.openapi_common import _op, _q, ref
from portunus.web.openapi_paging import PAGE_PARAMS, page_fields

_USER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "user_id": {"type": "string"},
        "display_name": {"type": "string"},
        "role": {"enum": ["superadmin", "user"]},
        "password_change_required": {"type": "boolean"},
        "has_password": {"type": "boolean"},
        "builtin": {"type": "boolean"},
        "created_at": {"type": "string", "format": "date-time"},
        "temporary_password": {
            "type": "string",
            "description": "Only when created without a password: "
            "shown once, must be changed at first login.",
        },
    },
    "required": ["user_id", "display_name", "role", "password_change_required"],
}
_ME = {
    "type": "object",
    "properties": {
        k: _USER["properties"][k]
        for k in ("user_id", "display_name", "role", "password_change_required")
    },
    "required": ["user_id", "display_name", "role", "password_change_required"],
}
_TOKEN: dict[str, Any] = {
    "type": "object",
    "properties": {
        "token_id": {"type": "integer"},
        "user_id": {"type": "string"},
        "name": {"type": ["string", "null"]},
        "created_at": {"type": "string"},
        "last_used_at": {"type": ["string", "null"]},
        "revoked_at": {"type": ["string", "null"]},
    },
    "required": ["token_id", "user_id", "name", "created_at"],
}
_GRANT = {
    "type": "object",
    "properties": {
        "grant_id": {"type": "integer"},
        "user_id": {"type": "string"},
        "client": {"type": "string", "description": "Client name, or `*` for every client."},
        "client_id": {"type": "string"},
        "listen_port_start": {"type": "integer"},
        "listen_port_end": {"type": "integer"},
        "protocols": {"type": "array", "items": {"enum": ["tcp", "udp"]}},
        "note": {"type": ["string", "null"]},
        "created_at": {"type": "string"},
    },
    "required": [
        "grant_id",
        "user_id",
        "client",
        "listen_port_start",
        "listen_port_end",
        "protocols",
    ],
}
_IDS = {"type": "array", "items": {"type": "integer"}}

SCHEMAS: dict[str, dict[str, Any]] = {
    "User": _USER,
    "Me": _ME,
    "UserList": {
        "type": "object",
        "properties": {
            "users": {"type": "array", "items": ref("User")},
            **page_fields("Users"),
        },
        "required": ["users", "next_cursor", "total"],
    },
    "UserRemoved": {
        "type": "object",
        "properties": {
            "user_id": {"type": "string"},
            "removed_rule_ids": _IDS,
            "revoked_grant_ids": _IDS,
            "revoked_token_ids": _IDS,
        },
        "required": ["user_id", "removed_rule_ids", "revoked_grant_ids", "revoked_token_ids"],
    },
    "PasswordSet": {
        "type": "object",
        "properties": {
            "user_id": {"type": "string"},
            "password_change_required": {"type": "boolean"},
            "revoked_sessions": {"type": "integer"},
            "temporary_password": {"type": "string"},
        },
        "required": ["user_id", "password_change_required"],
    },
    "Token": _TOKEN,
    "IssuedToken": {
        "type": "object",
        "properties": {
            **_TOKEN["properties"],
            "token": {"type": "string", "description": "Shown once; only its hash is stored."},
        },
        "required": ["token_id", "token", "name", "created_at"],
    },
    "TokenList": {
        "type": "object",
        "properties": {
            "tokens": {"type": "array", "items": ref("Token")},
            **page_fields("Tokens"),
        },
        "required": ["tokens", "next_cursor", "total"],
    },
    "Grant": _GRANT,
    "GrantList": {
        "type": "object",
        "properties": {
            "grants": {"type": "array", "items": ref("Grant")},
            **page_fields("Grants"),
        },
        "required": ["grants", "next_cursor", "total"],
    },
    "GrantRevoked": {
        "type": "object",
        "properties": {"grant_id": {"type": "integer"}, "removed_rule_ids": _IDS},
        "required": ["grant_id", "removed_rule_ids"],
    },
}

_USER_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    # A longer id is refused (400 validation.user_id) before it is looked up.
    "description": "User id (at most 64 characters)",
}
_NUM_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
_COOKIE = {
    "Set-Cookie": {
        "description": "portunus_session=…; HttpOnly; SameSite=Strict; Path=/ (+ Secure "
        "over https)",
        "schema": {"type": "string"},
    }
}


def _with_cookie(op: dict[str, Any], status: str) -> dict[str, Any]:
    op["responses"][status]["headers"] = _COOKIE
    return op


PATHS: dict[str, dict[str, Any]] = {
    "/v1/auth/login": {
        "post": _with_cookie(
            _op(
                "login",
                "Log in to the Web UI: sets the session cookie",
                "200",
                ref("Me"),
                ("400", "401", "413", "429", "503"),
                body="LoginBody",
                public=True,
            ),
            "200",
        ),
    },
    "/v1/auth/setup": {
        "post": _with_cookie(
            _op(
                "setup",
                "First run: redeem the setup token, create the first superadmin and log in",
                "201",
                ref("Me"),
                ("400", "401", "409", "413", "503"),
                body="SetupBody",
                public=True,
            ),
            "201",
        ),
    },
    "/v1/auth/logout": {
        "post": _op("logout", "End this session and clear the cookie", "204", None, ()),
    },
    "/v1/users/me": {"get": _op("me", "Who is calling", "200", ref("Me"), ())},
    "/v1/users/me/password": {
        "post": _op(
            "changeMyPassword",
            "Change your own password; your other sessions end",
            "204",
            None,
            ("400", "413"),
            body="OwnPasswordBody",
        ),
    },
    "/v1/users": {
        "get": _op(
            "listUsers",
            "Users, one page, by user id (superadmin)",
            "200",
            ref("UserList"),
            ("400",),
            params=[
                *PAGE_PARAMS,
                _q("role", {"enum": ["superadmin", "user"]}, "Only this role"),
                _q(
                    "name_prefix",
                    {"type": "string", "maxLength": 64},
                    "Only user ids starting with this (case-sensitive)",
                ),
            ],
        ),
        "post": _op(
            "addUser",
            "Create a user (superadmin)",
            "201",
            ref("User"),
            ("400", "409", "413"),
            body="UserBody",
        ),
    },
    "/v1/users/{id}": {
        "parameters": [_USER_PARAM],
        "get": _op(
            "getUser", "One user (superadmin, or yourself)", "200", ref("User"), ("400", "404")
        ),
        "delete": _op(
            "removeUser",
            "Remove a user with its rules (drained), tokens, grants and sessions",
            "200",
            ref("UserRemoved"),
            ("400", "404", "409"),
        ),
    },
    "/v1/users/{id}/password": {
        "parameters": [_USER_PARAM],
        "post": _op(
            "setUserPassword",
            "Set a user's password (superadmin); the user's sessions end",
            "200",
            ref("PasswordSet"),
            ("400", "404", "413"),
            body="PasswordBody",
        ),
    },
    "/v1/users/{id}/tokens": {
        "parameters": [_USER_PARAM],
        "get": _op(
            "listTokens",
            "A user's API tokens, one page, by token id (superadmin, or your own)",
            "200",
            ref("TokenList"),
            ("400", "404"),
            params=list(PAGE_PARAMS),
        ),
        "post": _op(
            "issueToken",
            "Issue an API token acting as the user; shown once",
            "201",
            ref("IssuedToken"),
            ("400", "404", "413"),
            body="TokenBody",
        ),
    },
    "/v1/tokens/{id}": {
        "parameters": [_NUM_PARAM],
        "delete": _op(
            "revokeToken",
            "Revoke a token; it fails from the next request on",
            "204",
            None,
            ("404", "409"),
        ),
    },
    "/v1/grants": {
        "get": _op(
            "listGrants",
            "Grants, one page, by grant id (superadmin: all or ?user=; a user: its own)",
            "200",
            ref("GrantList"),
            ("400", "404", "409"),
            params=[
                *PAGE_PARAMS,
                _q("user", {"type": "string"}, "Only this user's grants"),
                _q(
                    "client",
                    {"type": "string"},
                    "Only grants naming this client (id or name; * = the every-client grants)",
                ),
            ],
        ),
        "post": _op(
            "addGrant",
            "Grant a user a client, protocols and a listen-port range (superadmin)",
            "201",
            ref("Grant"),
            ("400", "404", "409", "413"),
            body="GrantBody",
        ),
    },
    "/v1/grants/{id}": {
        "parameters": [_NUM_PARAM],
        "delete": _op(
            "revokeGrant",
            "Revoke a grant; the user's rules it alone covered are removed (drained)",
            "200",
            ref("GrantRevoked"),
            ("404",),
        ),
    },
}
