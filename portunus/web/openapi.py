"""The OpenAPI 3.1 document of the operator API.

The request-body schemas are generated from the declarations in
``portunus.schema`` — the same ones every boundary validates against — so the
published contract and the checks cannot drift apart.  Response schemas and
operations are plain dicts: rules here, clients/owners/audit/traffic in
``openapi_clients``, users/tokens/grants/sessions in ``openapi_users``, all built
with the helpers of ``openapi_common`` (which imports none of them).
"""

from __future__ import annotations

import copy
from typing import Any

from portunus.schema import generate
from portunus.web import openapi_clients, openapi_schemas, openapi_users
from portunus.web.openapi_common import _BOOL, _ID_PARAM, ERROR_STATUSES, _json, _op, _q, ref
from portunus.web.openapi_paging import PAGE_PARAMS

__all__ = ["ERROR_STATUSES", "build_openapi", "components", "schema"]

_SCHEMAS: dict[str, dict[str, Any]] = {
    **generate.published(),
    **openapi_schemas.SCHEMAS,
    **openapi_users.SCHEMAS,
}

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
    "/v1/rules/{id}/retry": {
        "parameters": [_ID_PARAM],
        "post": _op(
            "retryRule",
            "Bind a failed rule again now (e.g. after its port was freed); answers like a push: "
            "the rule once bound, `activation_failed` with `rule` while it still cannot be",
            "200",
            ref("Rule"),
            ("400", "404", "409", "422", "504"),
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
    **openapi_clients.PATHS,
    **openapi_users.PATHS,
}


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
