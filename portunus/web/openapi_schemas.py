"""The response schemas of rules, clients, owner caps, audit and traffic (the
request bodies are generated from ``portunus.schema``; users' in
``openapi_users``)."""

from __future__ import annotations

from typing import Any

from portunus.web.openapi_common import ref
from portunus.web.openapi_paging import page_fields

_COUNTERS = {
    "bytes_in": {"type": "integer", "description": "Bytes received from connecting clients."},
    "bytes_out": {"type": "integer", "description": "Bytes sent back to connecting clients."},
    "connections_total": {"type": "integer"},
    "active_connections": {"type": "integer"},
}

SCHEMAS: dict[str, dict[str, Any]] = {
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
