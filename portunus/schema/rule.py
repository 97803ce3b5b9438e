"""The rule's request bodies: push (``RuleBody``), hot update (``RuleUpdate``), caps.

``POST /v1/rules``, the ``rules.push`` params of the CLI and the Web UI's push form
are one ``RuleBody``; ``PUT /v1/rules/{id}`` and ``rules.update`` one
``RuleUpdate``.  Shapes a struct cannot express (exactly one of ``listen_port`` or
``listen_port_start``+``listen_port_end``) are JSON Schema ``oneOf`` in
``SCHEMA_EXTRA``, published and enforced by ``portunus.schema.check``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from msgspec import UNSET, Meta, Struct, UnsetType

from portunus.bounds import (
    HEALTH_CHECK_INTERVAL,
    IDLE_TIMEOUT,
    MAX_NAME_LEN,
    MAX_SNI_LEN,
    PRIORITY,
    RATE_LIMIT_VALUE,
)
from portunus.schema.types import PROXY, Port, Protocol, ProxyVersion, about, within

MAX_TARGETS = 8
MAX_CLIENT_REF = 2 * MAX_NAME_LEN  # a client name or a client id

_CAP = within(RATE_LIMIT_VALUE, "validation.rate_limit")
InBps = Annotated[
    Annotated[int, _CAP] | None, about("Cap bytes/s from connecting clients towards the targets")
]
OutBps = Annotated[Annotated[int, _CAP] | None, about("Cap bytes/s back to the connecting clients")]
ConnRate = Annotated[Annotated[int, _CAP] | None, about("Cap new connections per second")]
Concurrent = Annotated[
    Annotated[int, _CAP] | None, about("Cap connections (UDP: flows) open at once")
]
Burst = Annotated[Annotated[int, _CAP] | None, about("Burst allowed above the cap of that name.")]


class RateLimit(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A rule's caps (and, as ``OwnerCaps``, an owner's on one client)."""

    bandwidth_in_bps: InBps = None
    bandwidth_out_bps: OutBps = None
    new_connections_per_sec: ConnRate = None
    concurrent_connections: Concurrent = None
    bandwidth_in_bps_burst: Burst = None
    bandwidth_out_bps_burst: Burst = None
    new_connections_per_sec_burst: Burst = None
    concurrent_connections_burst: Burst = None

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {
        "type": ["object", "null"],
        "description": "Caps; every key optional, null or absent = uncapped. "
        "`*_burst` sizes the bucket.",
        "x-error-code": "validation.rate_limit",
        "x-unknown-field-code": "validation.rate_limit",
        "x-unknown-field-message": "unknown rate_limit key {field}; known: {known}",
    }

    def caps(self) -> dict[str, int] | None:
        """The caps that are set (None when none is)."""
        out = {k: getattr(self, k) for k in self.__struct_fields__}
        return {k: v for k, v in out.items() if v is not None} or None


RATE_LIMIT_ALL_KEYS: tuple[str, ...] = RateLimit.__struct_fields__
RATE_LIMIT_KEYS = RATE_LIMIT_ALL_KEYS[:4]


class OwnerCaps(RateLimit, forbid_unknown_fields=True, omit_defaults=True):
    """``PUT /v1/clients/{id}/owners/{owner}/rate-limit``: never null."""

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {
        **RateLimit.SCHEMA_EXTRA,
        "type": "object",
        "description": "An owner's caps on one client, over all of the owner's rules there (the "
        "keys of a rule's rate_limit; *_bps in bytes per second). At least one cap is required.",
    }


def one_of(single: str, start: str, end: str) -> list[dict[str, Any]]:
    """``single`` alone, or ``start`` and ``end`` together (JSON Schema)."""
    return [
        {"required": [single], "not": {"anyOf": [{"required": [start]}, {"required": [end]}]}},
        {"required": [start, end], "not": {"required": [single]}},
    ]


class TargetBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One upstream of a pushed rule."""

    host: Annotated[str, Meta(min_length=1, max_length=255), about(None, "validation.target_host")]
    port: Port | UnsetType = UNSET
    port_start: Port | UnsetType = UNSET
    port_end: Port | UnsetType = UNSET
    priority: Annotated[
        int,
        within(
            PRIORITY,
            "validation.priority",
            "Lower is preferred; equal priorities are tried in order.",
        ),
    ] = 1
    proxy_protocol: Annotated[ProxyVersion | None, PROXY] = None

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {
        "description": "One upstream: `port` for a single-port rule, `port_start`+`port_end` "
        "for a range rule.",
        "oneOf": one_of("port", "port_start", "port_end"),
        "x-error-code": "validation.targets",
        "x-error-message": "a target needs port, or port_start and port_end (not both)",
    }


Targets = Annotated[
    list[TargetBody], Meta(min_length=1, max_length=MAX_TARGETS), about(None, "validation.targets")
]
ClientRef = Annotated[
    Annotated[str, Meta(min_length=1, max_length=MAX_CLIENT_REF)] | int,
    about("Client name or client_id; `local` is the server itself.", "validation.client"),
]
SniPattern = Annotated[
    Annotated[str, Meta(max_length=MAX_SNI_LEN)] | None,
    about(
        "Exact host name or `*.domain`; omit for the port's fallback rule.",
        "validation.sni_pattern",
    ),
]
IdleTimeout = Annotated[
    Annotated[float, within(IDLE_TIMEOUT, "validation.idle_timeout_secs")] | None,
    about(
        "Close a connection (UDP: flow) that moved no byte for this long; omit or null for "
        "no timeout.",
        "validation.idle_timeout_secs",
    ),
]
Owner = Annotated[
    str,
    Meta(max_length=64),
    about(
        "Superadmin only: push for this user (checked against the user's grants).",
        "validation.owner",
    ),
]


class RuleBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A rule to push."""

    targets: Targets
    client: ClientRef = "local"
    protocol: Protocol = "tcp"
    listen_port: Port | UnsetType = UNSET
    listen_port_start: Port | UnsetType = UNSET
    listen_port_end: Port | UnsetType = UNSET
    sni_pattern: SniPattern = None
    proxy_protocol: Annotated[ProxyVersion | None, PROXY] = None
    prefer_ipv6: Annotated[bool, about(None, "validation.prefer_ipv6")] = False
    rate_limit: RateLimit | None = None
    health_check_interval_secs: Annotated[
        float, within(HEALTH_CHECK_INTERVAL, "validation.health_check_interval_secs")
    ] = 5.0
    owner: Owner | UnsetType = UNSET
    idle_timeout_secs: IdleTimeout = None

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {
        "description": "A rule to push. Exactly one of listen_port or "
        "listen_port_start+listen_port_end.",
        "allOf": [
            {
                "oneOf": one_of("listen_port", "listen_port_start", "listen_port_end"),
                "x-error-code": "validation.listen_port",
                "x-error-message": "give listen_port, or listen_port_start and listen_port_end "
                "(not both)",
            }
        ],
    }


class RuleUpdate(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What ``rules.update`` may change in place."""

    rate_limit: RateLimit | None | UnsetType = UNSET
    targets: Targets | UnsetType = UNSET

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {
        "description": "Change the caps and/or the targets of an existing rule in place: same "
        "id, the listener never closes, open connections keep their target, new ones use the "
        "new targets.",
        "x-unknown-field-code": "validation.immutable_field",
        "x-unknown-field-message": "{field} cannot be changed on an existing rule (only "
        "rate_limit and targets can); remove the rule and push a new one",
    }
