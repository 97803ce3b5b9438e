"""A ``[[rule]]`` table of the standalone TOML file, declared.

The keys a rule may have are this struct's fields; the keys it shares with the
HTTP rule body (``protocol``, ``proxy_protocol``, ``prefer_ipv6``, ``rate_limit``,
``health_check_interval_secs``, ``idle_timeout_secs``) have the body's types,
ranges and error codes, so a file and a ``POST /v1/rules`` refuse the same value
with the same words.  The keys with a syntax of their own (``name``,
``listen_port``/``listen_ports`` with ``"LO-HI"``, ``target = "host:port@prio"``,
target tables with ``ports``) are ``Any`` here and parsed by
``portunus.config``.  Not part of the OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from msgspec import UNSET, Struct, UnsetType

from portunus.bounds import HEALTH_CHECK_INTERVAL
from portunus.schema.rule import IdleTimeout, RateLimit, TargetBody
from portunus.schema.types import PROXY, Protocol, ProxyVersion, about, within


class StandaloneRule(Struct):
    name: Any = None
    protocol: Protocol = "tcp"
    listen_port: Any = None
    listen_ports: Any = None
    target: Any = None
    targets: Any = None
    sni: Annotated[str, about(None, "validation.sni_pattern")] | UnsetType = UNSET
    proxy_protocol: Annotated[ProxyVersion, PROXY] | UnsetType = UNSET
    prefer_ipv6: Annotated[bool, about(None, "validation.prefer_ipv6")] = False
    rate_limit: RateLimit | UnsetType = UNSET
    health_check_interval_secs: Annotated[
        float, within(HEALTH_CHECK_INTERVAL, "validation.health_check_interval_secs")
    ] = 5.0
    idle_timeout_secs: IdleTimeout = None

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {"x-error-code": "validation.config"}


# The keys of a target table (``targets = [{...}]``): the body's, with ``port`` +
# ``port_end`` or ``ports = "LO-HI"`` for a range (no ``port_start``).
TARGET_KEYS = (frozenset(TargetBody.__struct_fields__) - {"port_start"}) | {"ports"}
