"""A rule as the server sends it to an edge (``Rule.to_wire``), declared for the
edge's check of every rule it receives.

Unknown keys are allowed (a newer server may send more); every number must be
finite and in the range ``portunus.bounds`` gives, so a malformed rule fails alone
(``edge.link``) instead of reaching the supervisor.  Not part of the OpenAPI
document.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from msgspec import Struct

from portunus.bounds import HEALTH_CHECK_INTERVAL, IDLE_TIMEOUT, PRIORITY
from portunus.schema.rule import RateLimit
from portunus.schema.types import Port, Protocol, about, within


class WireTarget(Struct):
    host: Annotated[str, about(None, "validation.target_host")]
    port: Port
    port_end: Port | None = None
    priority: Annotated[int, within(PRIORITY, "validation.priority")] = 1
    proxy_protocol: Annotated[str | None, about(None, "validation.proxy_protocol")] = None

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {"x-error-code": "validation.targets"}


class WireRule(Struct):
    id: Annotated[str | int, about(None, "validation.rule")]
    protocol: Protocol
    listen_start: Port
    listen_end: Port
    targets: Annotated[list[WireTarget], about(None, "validation.targets")]
    client: str = "local"
    owner: str | None = ""
    sni: Annotated[str | None, about(None, "validation.sni_pattern")] = None
    proxy_protocol: Annotated[str | None, about(None, "validation.proxy_protocol")] = None
    prefer_ipv6: bool = False
    rate_limit: RateLimit | None = None
    health_check_interval_secs: Annotated[
        float, within(HEALTH_CHECK_INTERVAL, "validation.health_check_interval_secs")
    ] = 5.0
    sni_fallback: bool = False
    idle_timeout_secs: (
        Annotated[float, within(IDLE_TIMEOUT, "validation.idle_timeout_secs")] | None
    ) = None

    SCHEMA_EXTRA: ClassVar[dict[str, Any]] = {"x-error-code": "validation.rule"}
