"""The OpenAPI paths of clients, owner caps, audit, traffic, health and the
document itself (merged into ``portunus.web.openapi``)."""

from __future__ import annotations

from typing import Any

from portunus.web.openapi_common import _CLIENT_PARAM, _WHEN, _op, _q, ref

PATHS: dict[str, dict[str, Any]] = {
    "/v1/clients": {
        "get": _op(
            "listClients",
            "Enrolled clients and their connection state, one page (local first, then "
            "enrollment order)",
            "200",
            ref("ClientList"),
            ("400",),
            params=[
                _q(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    "Page size",
                ),
                _q("cursor", {"type": "string"}, "next_cursor of the previous page"),
                _q(
                    "connected",
                    {"type": "boolean"},
                    "Only connected (true) or disconnected (false) clients",
                ),
                _q(
                    "name_prefix",
                    {"type": "string", "minLength": 1, "maxLength": 64},
                    "Only clients whose name starts with this (case-sensitive)",
                ),
            ],
        ),
    },
    "/v1/client-enrollments": {
        "post": _op(
            "enrollClient",
            "Enroll an edge client; answers the one-time enrollment URI and command",
            "201",
            ref("ClientEnrollment"),
            ("400", "413"),
            body="ClientEnrollmentBody",
        ),
    },
    "/v1/clients/{id}": {
        "parameters": [_CLIENT_PARAM],
        "get": _op(
            "getClient", "One client by id or name", "200", ref("Client"), ("400", "404", "409")
        ),
        "delete": _op(
            "deleteClient",
            "Delete a revoked client and its rules",
            "204",
            None,
            ("400", "404", "409"),
        ),
    },
    "/v1/clients/{id}/name": {
        "parameters": [_CLIENT_PARAM],
        "patch": _op(
            "renameClient",
            "Rename a client; its id, rules and live session stay",
            "200",
            ref("Client"),
            ("400", "404", "409", "413"),
            body="ClientRename",
        ),
    },
    "/v1/clients/{id}/revoke": {
        "parameters": [_CLIENT_PARAM],
        "post": _op(
            "revokeClient",
            "Revoke a client: its session closes at once and its token stops working",
            "200",
            ref("ClientRevoked"),
            ("400", "404", "409"),
        ),
    },
    "/v1/clients/{id}/owners": {
        "parameters": [_CLIENT_PARAM],
        "get": _op(
            "listOwners",
            "Owners with rules or caps on a client, and their caps",
            "200",
            ref("OwnerList"),
            ("400", "404", "409"),
        ),
    },
    "/v1/clients/{id}/owners/{owner}/rate-limit": {
        "parameters": [
            _CLIENT_PARAM,
            {
                "name": "owner",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "The owner's user id",
            },
        ],
        "get": _op(
            "getOwnerCap",
            "An owner's caps on a client",
            "200",
            ref("OwnerCap"),
            ("400", "404", "409"),
        ),
        "put": _op(
            "setOwnerCap",
            "Set an owner's caps on a client (applies to open connections at once); "
            "no caps at all is refused with `preflight`",
            "200",
            ref("OwnerCap"),
            ("400", "404", "409", "413", "422"),
            body="OwnerCaps",
        ),
        "delete": _op(
            "deleteOwnerCap", "Lift an owner's caps on a client", "204", None, ("400", "404", "409")
        ),
    },
    "/v1/audit": {
        "get": _op(
            "listAudit",
            "Audit trail, newest first",
            "200",
            ref("AuditPage"),
            ("400",),
            params=[
                _q("since", _WHEN, "Oldest entry time"),
                _q("until", _WHEN, "Newest entry time (exclusive)"),
                _q(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    "Page size",
                ),
                _q("cursor", {"type": "string"}, "next_cursor of the previous page"),
                _q("actor", {"type": "string"}, "Only entries of this actor"),
                _q("outcome", {"type": "string"}, "Only entries with this outcome (ok or error)"),
            ],
        ),
    },
    "/v1/traffic": {
        "get": _op(
            "trafficHistory",
            "Stored traffic of a rule, client or owner (1-minute buckets kept 7 days, 1-hour "
            "buckets 90 days); users see only their own rules",
            "200",
            ref("Traffic"),
            ("400", "404"),
            params=[
                _q("rule", {"type": "integer", "minimum": 1}, "One rule id"),
                _q("client", {"type": "string"}, "Client name or client_id"),
                _q("owner", {"type": "string"}, "Owner user"),
                _q(
                    "from",
                    {"type": "string"},
                    "Start: RFC 3339, Unix time, or an age like 1h (default: 1 hour before `to`)",
                ),
                _q("to", {"type": "string"}, "End (default now)"),
                _q(
                    "resolution",
                    {"enum": ["minute", "hour"]},
                    "Bucket width (default minute for up to 2 days within the last 7)",
                ),
            ],
        ),
    },
    "/v1/traffic/summary": {
        "get": _op(
            "trafficSummary",
            "Throughput now (latest sample) and the top rules by bytes",
            "200",
            ref("TrafficSummary"),
            ("400",),
            params=[
                _q("owner", {"type": "string"}, "Owner user"),
                _q("since", {"type": "string"}, "Window of the top list (default 1h)"),
                _q(
                    "limit",
                    {"type": "integer", "minimum": 0, "maximum": 50},
                    "Top list size (0: none)",
                ),
            ],
        ),
    },
    "/v1/health": {
        "get": _op(
            "health",
            "200 when the control process answers; no token needed",
            "200",
            ref("Health"),
            ("503",),
            public=True,
        ),
    },
    "/v1/openapi.json": {
        "get": _op("openapi", "This document", "200", {"type": "object"}, (), public=True),
    },
}
