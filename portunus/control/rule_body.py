"""The rule body of ``rules.push`` / ``POST /v1/rules`` → a validated ``Rule``.

The body's shape (types, ranges, unknown keys, ``listen_port`` xor a range) is the
``RuleBody`` declaration's (``portunus.schema.rule``): the same check, codes and
messages as the web process applies to ``POST /v1/rules``, here for the CLI and
any other socket client.  What is left is semantic and needs the rule as a whole:
a reversed range, host syntax, and ``build_rule``'s cross-field rules (range size
and lengths, PROXY protocol on TCP only, SNI on single TCP ports) shared with the
TOML and CLI paths.
"""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

from portunus.errors import PortunusError, ValidationError
from portunus.rules import Rule, Target, build_rule, validate_host
from portunus.schema.check import validate
from portunus.schema.rule import MAX_CLIENT_REF, RuleBody, TargetBody


def target_from_body(t: TargetBody, i: int) -> Target:
    """A declared target (shape already checked) as the data plane's ``Target``."""
    where = f"targets[{i}]"
    if t.port is not UNSET:
        lo = hi = t.port
    else:
        assert t.port_start is not UNSET and t.port_end is not UNSET  # the schema's oneOf
        lo, hi = t.port_start, t.port_end
        if lo > hi:
            raise ValidationError(
                "validation.port_range",
                f"{where}: port_start must be <= port_end",
                field=f"{where}.port_start",
            )
    return Target(
        host=validate_host(t.host, f"{where}.host"),
        port=lo,
        port_end=hi if hi != lo else None,
        priority=t.priority,
        proxy_protocol=t.proxy_protocol,
    )


def _listen(b: RuleBody) -> tuple[tuple[int, int], str]:
    """``(lo, hi)`` and the field name to blame for range errors."""
    if b.listen_port is not UNSET:
        return (b.listen_port, b.listen_port), "listen_port"
    assert b.listen_port_start is not UNSET and b.listen_port_end is not UNSET  # oneOf
    lo, hi = b.listen_port_start, b.listen_port_end
    if lo > hi:
        raise ValidationError(
            "validation.port_range",
            f"listen range {lo}-{hi} is reversed: listen_port_start must be <= listen_port_end",
            field="listen_port_start",
        )
    return (lo, hi), "listen_port_start"


def parse_rule_body(body: Any, range_max_ports: int) -> tuple[Rule, str]:
    """Validate a push body; return the rule (``id`` "0", ``client`` unresolved)
    and the client reference (a name or an id; default ``local``)."""
    b = validate(body, RuleBody)
    client = str(b.client) if isinstance(b.client, int) else b.client  # a client named "7"
    if not client.strip():
        raise ValidationError(
            "validation.client",
            f"client must be a client name or id (at most {MAX_CLIENT_REF} characters)",
            field="client",
        )
    listen, listen_field = _listen(b)
    targets = [target_from_body(t, i) for i, t in enumerate(b.targets)]
    try:
        rule = build_rule(
            id="0",
            protocol=b.protocol,
            listen=listen,
            targets=targets,
            sni=b.sni_pattern,
            proxy_protocol=b.proxy_protocol,
            prefer_ipv6=b.prefer_ipv6,
            rate_limit=b.rate_limit.caps() if b.rate_limit is not None else None,
            health_check_interval_secs=b.health_check_interval_secs,
            range_max_ports=range_max_ports,
            idle_timeout_secs=b.idle_timeout_secs,
        )
    except PortunusError as exc:
        if exc.details.get("field") == "listen":
            exc.details["field"] = listen_field
        raise
    return rule, client.strip()
