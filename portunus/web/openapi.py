"""The OpenAPI 3.1 document of the operator API, built from plain dicts.

The request-body schemas here are also what the web layer validates bodies
against (``portunus.web.routes.bodies``), so the published contract and the
boundary checks cannot drift apart.  ``x-error-code`` on a schema names the
``validation.*`` code reported for a bad value under it (the same codes
``portunus.rules`` uses); ``x-error-message`` is the message for a failed
``oneOf`` shape check; ``x-unknown-field-code``/``-message`` apply to keys an
object does not allow.
"""

from __future__ import annotations

import copy
from typing import Any

from portunus.bounds import (
    ENROLL_TTL,
    HEALTH_CHECK_INTERVAL,
    IDLE_TIMEOUT,
    MAX_NAME_LEN,
    PRIORITY,
    RATE_LIMIT_VALUE,
)
from portunus.rules import MAX_TARGETS, RATE_LIMIT_ALL_KEYS
from portunus.web.openapi_paging import PAGE_PARAMS, page_fields

JSON = "application/json"
_REF = "#/components/schemas/"


def ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF + name}


def _port(code: str = "validation.port") -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": 65535, "x-error-code": code}


_PROXY = {
    "enum": ["v1", "v2", None],
    "x-error-code": "validation.proxy_protocol",
    "description": "Send a PROXY protocol header of this version to the target (TCP rules only).",
}

RATE_LIMIT: dict[str, Any] = {
    "type": ["object", "null"],
    "description": "Caps; every key optional, null or absent = uncapped. `*_burst` sizes the bucket.",
    "properties": {
        k: {"type": ["integer", "null"], "minimum": 1, "maximum": RATE_LIMIT_VALUE.hi}
        for k in RATE_LIMIT_ALL_KEYS
    },
    "additionalProperties": False,
    "x-error-code": "validation.rate_limit",
    "x-unknown-field-code": "validation.rate_limit",
    "x-unknown-field-message": "unknown rate_limit key {field}; known: "
    + ", ".join(RATE_LIMIT_ALL_KEYS),
}

OWNER_CAPS: dict[str, Any] = {
    **RATE_LIMIT,
    "type": "object",
    "description": "An owner's caps on one client, over all of the owner's rules there (the keys of a "
    "rule's rate_limit; *_bps in bytes per second). At least one cap is required.",
}

TARGET_BODY: dict[str, Any] = {
    "type": "object",
    "description": "One upstream: `port` for a single-port rule, `port_start`+`port_end` for a range rule.",
    "properties": {
        "host": {
            "type": "string",
            "minLength": 1,
            "maxLength": 255,
            "x-error-code": "validation.target_host",
        },
        "port": _port(),
        "port_start": _port(),
        "port_end": _port(),
        "priority": PRIORITY.schema(
            default=1,
            **{"x-error-code": "validation.priority"},
            description="Lower is preferred; equal priorities are tried in order.",
        ),
        "proxy_protocol": _PROXY,
    },
    "required": ["host"],
    "additionalProperties": False,
    "oneOf": [
        {
            "required": ["port"],
            "not": {"anyOf": [{"required": ["port_start"]}, {"required": ["port_end"]}]},
        },
        {"required": ["port_start", "port_end"], "not": {"required": ["port"]}},
    ],
    "x-error-code": "validation.targets",
    "x-error-message": "a target needs port, or port_start and port_end (not both)",
}

RULE_BODY: dict[str, Any] = {
    "type": "object",
    "description": "A rule to push. Exactly one of listen_port or listen_port_start+listen_port_end.",
    "properties": {
        "client": {
            "type": ["string", "integer"],
            "default": "local",
            "x-error-code": "validation.client",
            "maxLength": 2 * MAX_NAME_LEN,
            "description": "Client name or client_id; `local` is the server itself.",
        },
        "protocol": {
            "enum": ["tcp", "udp"],
            "default": "tcp",
            "x-error-code": "validation.protocol",
        },
        "listen_port": _port(),
        "listen_port_start": _port(),
        "listen_port_end": _port(),
        "targets": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_TARGETS,
            "items": ref("TargetBody"),
            "x-error-code": "validation.targets",
        },
        "sni_pattern": {
            "type": ["string", "null"],
            "maxLength": 253,
            "x-error-code": "validation.sni_pattern",
            "description": "Exact host name or `*.domain`; omit for the port's fallback rule.",
        },
        "proxy_protocol": _PROXY,
        "prefer_ipv6": {
            "type": "boolean",
            "default": False,
            "x-error-code": "validation.prefer_ipv6",
        },
        "rate_limit": ref("RateLimit"),
        "health_check_interval_secs": HEALTH_CHECK_INTERVAL.schema(
            default=5, **{"x-error-code": "validation.health_check_interval_secs"}
        ),
        "owner": {
            "type": "string",
            "maxLength": 64,
            "x-error-code": "validation.owner",
            "description": "Superadmin only: push for this user (checked against the user's grants).",
        },
        "idle_timeout_secs": IDLE_TIMEOUT.schema(
            type=["number", "null"],
            default=None,
            **{"x-error-code": "validation.idle_timeout_secs"},
            description="Close a connection (UDP: flow) that moved no byte for this long; omit or null "
            "for no timeout.",
        ),
    },
    "required": ["targets"],
    "additionalProperties": False,
    "x-error-code": "validation.body",
    "allOf": [
        {
            "oneOf": [
                {
                    "required": ["listen_port"],
                    "not": {
                        "anyOf": [
                            {"required": ["listen_port_start"]},
                            {"required": ["listen_port_end"]},
                        ]
                    },
                },
                {
                    "required": ["listen_port_start", "listen_port_end"],
                    "not": {"required": ["listen_port"]},
                },
            ],
            "x-error-code": "validation.listen_port",
            "x-error-message": "give listen_port, or listen_port_start and listen_port_end (not both)",
        }
    ],
}

RULE_UPDATE: dict[str, Any] = {
    "type": "object",
    "description": "Change the caps and/or the targets of an existing rule in place: same id, "
    "the listener never closes, open connections keep their target, new ones use the new targets.",
    "properties": {
        "rate_limit": ref("RateLimit"),
        "targets": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_TARGETS,
            "items": ref("TargetBody"),
            "x-error-code": "validation.targets",
        },
    },
    "additionalProperties": False,
    "x-error-code": "validation.body",
    "x-unknown-field-code": "validation.immutable_field",
    "x-unknown-field-message": "{field} cannot be changed on an existing rule (only rate_limit and targets "
    "can); remove the rule and push a new one",
}

_COUNTERS = {
    "bytes_in": {"type": "integer", "description": "Bytes received from connecting clients."},
    "bytes_out": {"type": "integer", "description": "Bytes sent back to connecting clients."},
    "connections_total": {"type": "integer"},
    "active_connections": {"type": "integer"},
}

_CLIENT_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "x-error-code": "validation.name",
    "description": "Free-form client name; `local` is reserved for the server itself.",
}

_SCHEMAS: dict[str, dict[str, Any]] = {
    "RateLimit": RATE_LIMIT,
    "TargetBody": TARGET_BODY,
    "RuleBody": RULE_BODY,
    "RuleUpdate": RULE_UPDATE,
    "OwnerCaps": OWNER_CAPS,
    "OwnerCap": {
        "type": "object",
        "properties": {
            "client_id": {"type": "string"},
            "client": {"type": "string"},
            "owner": {"type": "string"},
            "rate_limit": ref("RateLimit"),
            "updated_at": {"type": "string", "format": "date-time"},
        },
    },
    "OwnerList": {
        "type": "object",
        "properties": {
            "client_id": {"type": "string"},
            "client": {"type": "string"},
            "owners": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "owner": {"type": "string"},
                        "rule_count": {"type": "integer"},
                        "rate_limit": ref("RateLimit"),
                        "updated_at": {"type": ["string", "null"], "format": "date-time"},
                    },
                },
            },
        },
    },
    "Target": {
        "type": "object",
        "properties": {
            "host": {"type": "string"},
            "port": {"type": "integer"},
            "port_start": {"type": "integer"},
            "port_end": {"type": "integer"},
            "priority": {"type": "integer"},
            "proxy_protocol": {"type": ["string", "null"]},
        },
        "required": ["host", "priority"],
    },
    "Rule": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "client": {"type": "string", "description": "Client name."},
            "client_id": {"type": ["string", "integer"]},
            "protocol": {"enum": ["tcp", "udp"]},
            "listen_port": {"type": "integer"},
            "listen_port_start": {"type": "integer"},
            "listen_port_end": {"type": "integer"},
            "targets": {"type": "array", "items": ref("Target")},
            "sni_pattern": {"type": ["string", "null"]},
            "proxy_protocol": {"type": ["string", "null"]},
            "prefer_ipv6": {"type": "boolean"},
            "health_check_interval_secs": {"type": "number"},
            "idle_timeout_secs": {"type": ["number", "null"]},
            "rate_limit": ref("RateLimit"),
            "owner": {"type": ["string", "null"]},
            "state": {"enum": ["pending", "active", "failed", "draining", "revoked"]},
            "failure_reason": {
                "type": ["string", "null"],
                "examples": ["port_in_use (port 30005 already bound)"],
            },
            "created_at": {"type": "string", "format": "date-time"},
        },
        "required": ["id", "client", "protocol", "targets", "state"],
    },
    "RuleList": {
        "type": "object",
        "properties": {
            "rules": {"type": "array", "items": ref("Rule")},
            **page_fields("Rules"),
        },
        "required": ["rules", "next_cursor", "total"],
    },
    "Stats": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            **_COUNTERS,
            "per_port": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"port": {"type": "integer"}, **_COUNTERS},
                },
            },
            "per_target": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "target": {"type": "string", "description": "host:port"},
                        **_COUNTERS,
                    },
                },
            },
        },
        "required": ["id", "bytes_in", "bytes_out", "connections_total", "active_connections"],
    },
    "Client": {
        "type": "object",
        "properties": {
            "client_id": {"type": ["string", "integer"]},
            "client_name": {"type": "string"},
            "connected": {"type": "boolean"},
            "remote_addr": {"type": ["string", "null"]},
            "connected_since": {"type": ["string", "null"], "format": "date-time"},
            "version": {"type": ["string", "null"]},
            "capabilities": {"type": "array", "items": {"type": "string"}},
            "rule_count": {"type": "integer"},
        },
        "required": ["client_id", "client_name", "connected"],
    },
    "ClientList": {
        "type": "object",
        "properties": {
            "clients": {"type": "array", "items": ref("Client")},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as ?cursor= for the next page; null on the last",
            },
            "total": {"type": "integer", "description": "Clients matching the filters, all pages"},
        },
        "required": ["clients"],
    },
    "ClientEnrollmentBody": {
        "type": "object",
        "description": "Enroll a new edge client: mints a one-time code valid for ttl_secs.",
        "properties": {
            "name": _CLIENT_NAME,
            "address": {
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "x-error-code": "validation.address",
                "description": "Host the client dials (default: the host of control_listen, "
                "else the server's FQDN).",
            },
            "ttl_secs": ENROLL_TTL.schema(default=600, **{"x-error-code": "validation.ttl_secs"}),
        },
        "required": ["name"],
        "additionalProperties": False,
        "x-error-code": "validation.body",
    },
    "ClientEnrollment": {
        "type": "object",
        "properties": {
            "client_id": {"type": "string"},
            "client_name": {"type": "string"},
            "expires_at": {"type": "string", "format": "date-time"},
            "uri": {
                "type": "string",
                "examples": ["portunus://edge.example.com:7443/enroll?code=CODE&fp=sha256:HEX"],
            },
            "command": {
                "type": "string",
                "description": "`portunus-client enroll '<uri>'`, to run on the client.",
            },
        },
        "required": ["client_id", "client_name", "expires_at", "uri", "command"],
    },
    "ClientRename": {
        "type": "object",
        "properties": {"name": _CLIENT_NAME},
        "required": ["name"],
        "additionalProperties": False,
        "x-error-code": "validation.body",
    },
    "ClientRevoked": {
        "allOf": [ref("Client")],
        "type": "object",
        "properties": {
            "revoked_at": {"type": "string", "format": "date-time"},
            "disconnected": {"type": "boolean", "description": "A live session was closed."},
        },
        "required": ["client_id", "client_name", "revoked_at"],
    },
    "AuditEntry": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "ts": {"type": "string", "format": "date-time"},
            "actor": {"type": "string"},
            "action": {"type": "string"},
            "target": {"type": ["string", "null"]},
            "outcome": {"type": "string"},
            "error_code": {"type": ["string", "null"]},
        },
        "required": ["id", "ts", "actor", "action", "outcome"],
    },
    "AuditPage": {
        "type": "object",
        "properties": {
            "entries": {"type": "array", "items": ref("AuditEntry")},
            "next_cursor": {"type": ["string", "null"]},
        },
        "required": ["entries", "next_cursor"],
    },
    "TrafficPoint": {
        "type": "object",
        "description": "One bucket: bytes and new connections in [ts, ts + resolution).",
        "properties": {
            "ts": {"type": "integer", "description": "Unix seconds of the bucket start"},
            "bytes_in": {"type": "integer"},
            "bytes_out": {"type": "integer"},
            "connections": {"type": "integer"},
        },
        "required": ["ts", "bytes_in", "bytes_out", "connections"],
    },
    "Traffic": {
        "type": "object",
        "properties": {
            "resolution": {"enum": ["minute", "hour"]},
            "from": {"type": "integer"},
            "to": {"type": "integer"},
            "series": {"type": "array", "items": ref("TrafficPoint")},
        },
        "required": ["resolution", "from", "to", "series"],
    },
    "TrafficSummary": {
        "type": "object",
        "properties": {
            "bytes_in_per_sec": {"type": "number"},
            "bytes_out_per_sec": {"type": "number"},
            "per_rule": {"type": "object"},
            "since": {"type": "integer"},
            "top_rules": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "rule": {"type": "integer"},
                        "bytes_in": {"type": "integer"},
                        "bytes_out": {"type": "integer"},
                        "client": {"type": ["string", "null"]},
                        "protocol": {"type": ["string", "null"]},
                        "listen": {"type": ["string", "null"]},
                        "state": {
                            "type": ["string", "null"],
                            "description": "null once the rule is removed",
                        },
                    },
                },
            },
        },
        "required": ["bytes_in_per_sec", "bytes_out_per_sec", "top_rules"],
    },
    "Health": {"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]},
    "Error": {
        "type": "object",
        "description": "Every error. `code` is stable; other keys are details (e.g. `field`, `rule`).",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "code": {
                        "type": "string",
                        "examples": ["validation.port", "port_conflict", "ack_timeout"],
                    },
                    "message": {"type": "string"},
                    "field": {
                        "type": "string",
                        "description": "The offending body field or query parameter.",
                    },
                    "errors": {
                        "type": "array",
                        "description": "Every validation problem found.",
                        "items": {
                            "type": "object",
                            "properties": {
                                "code": {"type": "string"},
                                "field": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        },
                    },
                    "rule": {**ref("Rule"), "description": "On activation_failed and ack_timeout."},
                },
                "required": ["code", "message"],
            }
        },
        "required": ["error"],
    },
}

ERROR_STATUSES: dict[str, str] = {
    "400": "Invalid request (`validation.*`, `bad_request`)",
    "401": "Missing or bad bearer token or session (`unauthenticated`, `invalid_login`, `invalid_setup_token`)",
    "403": "Not allowed (`role_required`, `not_owner`, `client_not_granted`, `protocol_not_granted`, "
    "`port_outside_grant`, `csrf_failed`, `password_change_required`)",
    "404": "No such object (`not_found`, `rule_not_found`, `client_not_found`, `user_not_found`, "
    "`grant_not_found`, `token_not_found`)",
    "405": "Method not allowed on this path (`method_not_allowed`)",
    "408": "The request (headers and body) was not complete within 10 s (`request_timeout`)",
    "409": "Conflict (`port_conflict`, `ambiguous_client`, `conflict.*`, `user_exists`, `cannot_remove_self`, "
    "`last_superadmin`)",
    "413": "Request body over 64 KiB (`validation.body_too_large`)",
    "422": "Client or capability state (`client_not_connected`, `activation_failed` with `rule`, "
    "`*_unsupported_by_client`)",
    "429": "Throttled (`throttled`, `rate_limited` with a Retry-After header)",
    "500": "Internal error (`internal`)",
    "503": "The control process is not answering, or the listener has too many open connections "
    "(`unavailable`)",
    "504": "The client did not acknowledge in time (`ack_timeout` with `rule`, which stays pending)",
}

_COMMON = ("401", "403", "405", "408", "429", "500", "503")
# ?since= / ?until=: RFC 3339, a Unix time, `now` or an age (30m, 1h30m, 2d), so
# not `format: date-time` (which would call `1h` invalid).
_WHEN = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "description": "An RFC 3339 time (2024-05-01T12:00:00Z), a Unix time, `now`, or an age like 1h30m",
}
_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
_CLIENT_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "A client_id or a client name",
}


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _op(
    op_id: str,
    summary: str,
    ok: str,
    ok_body: dict[str, Any] | None,
    errors: tuple[str, ...],
    *,
    params: list[dict[str, Any]] | None = None,
    body: str | None = None,
    public: bool = False,
    content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {ok: {"description": summary}}
    if content is not None:
        responses[ok]["content"] = content
    elif ok_body is not None:
        responses[ok]["content"] = _json(ok_body)
    statuses = errors if public else tuple(sorted(set(errors) | set(_COMMON)))
    for status in statuses:
        responses[status] = {"$ref": f"#/components/responses/E{status}"}
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(ref(body))}
    if public:
        op["security"] = []
    return op


_BOOL = {"type": "boolean", "default": False}

_PATHS: dict[str, dict[str, Any]] = {
    "/v1/rules": {
        "get": _op(
            "listRules",
            "List rules, one page, ordered by id",
            "200",
            ref("RuleList"),
            ("400", "404", "409"),
            params=[
                _q("client", {"type": "string"}, "Client name or client_id"),
                _q("owner", {"type": "string"}, "Owner user"),
                _q(
                    "state",
                    {"enum": ["pending", "active", "failed", "draining", "revoked"]},
                    "Only this state",
                ),
                _q("protocol", {"enum": ["tcp", "udp"]}, "Only this protocol"),
                *PAGE_PARAMS,
            ],
        ),
        "post": _op(
            "pushRule",
            "Push a rule; answers once the client acknowledged it",
            "201",
            ref("Rule"),
            ("400", "404", "409", "413", "422", "504"),
            body="RuleBody",
            params=[
                _q(
                    "ack_timeout",
                    {"type": "number", "exclusiveMinimum": 0, "maximum": 60},
                    "Seconds to wait for the client's acknowledgement (default ack_timeout_secs)",
                )
            ],
        ),
    },
    "/v1/rules/{id}": {
        "parameters": [_ID_PARAM],
        "get": _op("getRule", "Show one rule", "200", ref("Rule"), ("404",)),
        "put": _op(
            "updateRule",
            "Hot-update a rule's caps",
            "200",
            ref("Rule"),
            ("400", "404", "413", "422"),
            body="RuleUpdate",
        ),
        "delete": _op(
            "removeRule", "Remove a rule (it drains, then disappears)", "204", None, ("404",)
        ),
    },
    "/v1/rules/{id}/stats": {
        "parameters": [_ID_PARAM],
        "get": _op(
            "ruleStats",
            "Counters of one rule",
            "200",
            ref("Stats"),
            ("400", "404"),
            params=[
                _q("per_port", _BOOL, "Add per-port counters (range rules)"),
                _q("per_target", _BOOL, "Add per-target counters"),
            ],
        ),
    },
    "/v1/rules/{id}/stats/stream": {
        "parameters": [_ID_PARAM],
        "get": _op(
            "ruleStatsStream",
            "Server-Sent Events: a `data: <Stats JSON>` event every interval; "
            "`event: end` (data `{reason}`) when the rule is gone; `event: error` on a failed read",
            "200",
            None,
            ("400", "404"),
            params=[
                _q(
                    "interval",
                    {"type": "number", "minimum": 0.2, "maximum": 60},
                    "Seconds between events (default stats_stream_interval_secs)",
                ),
                _q("per_port", _BOOL, "Add per-port counters"),
                _q("per_target", _BOOL, "Add per-target counters"),
            ],
            content={
                "text/event-stream": {"schema": {"type": "string"}, "x-event-data": ref("Stats")}
            },
        ),
    },
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


def _merge_users() -> None:
    """Users, tokens, grants and sessions live in their own module (imported
    here, at the end, because it builds its operations with ``_op``)."""
    from portunus.web.openapi_users import PATHS, SCHEMAS

    _SCHEMAS.update(SCHEMAS)
    _PATHS.update(PATHS)


_merge_users()


def build_openapi(version: str = "0") -> dict[str, Any]:
    """A fresh copy of the document (callers may not mutate the module's dicts)."""
    responses = {
        f"E{s}": {"description": d, "content": _json(ref("Error"))}
        for s, d in ERROR_STATUSES.items()
    }
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "Portunus operator API",
                "version": version,
                "description": "Port-forwarding rules, clients and audit. Errors are "
                '`{"error": {"code", "message", ...details}}`; the code is stable.',
            },
            "servers": [{"url": "/"}],
            "security": [{"bearer": []}, {"session": []}],
            "paths": _PATHS,
            "components": {
                "schemas": _SCHEMAS,
                "responses": responses,
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "An operator token (operator.token or a user token).",
                    },
                    "session": {
                        "type": "apiKey",
                        "in": "cookie",
                        "name": "portunus_session",
                        "description": "Web UI session (POST /v1/auth/login); writes "
                        "also need the header X-Portunus-CSRF: 1.",
                    },
                },
            },
        }
    )


def schema(name: str) -> dict[str, Any]:
    """A component schema by name (read-only use)."""
    return _SCHEMAS[name]


def components() -> dict[str, dict[str, Any]]:
    return _SCHEMAS
