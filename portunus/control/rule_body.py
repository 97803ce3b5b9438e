"""The rule body of ``rules.push`` / ``POST /v1/rules`` → a validated ``Rule``.

The body is JSON from a program (the CLI or a script over HTTP), so types are
checked strictly and unknown keys are refused: a misspelt ``rate_limt`` must not
silently push an uncapped rule.  Cross-field validation is ``build_rule``'s, the
same as for the TOML and CLI paths.
"""

from __future__ import annotations

from typing import Any

from portunus.bounds import HEALTH_CHECK_INTERVAL, MAX_NAME_LEN, PRIORITY
from portunus.errors import PortunusError, ValidationError
from portunus.rules import (
    Rule,
    Target,
    build_rule,
    clip,
    parse_port,
    validate_host,
    validate_rate_limit,
)

BODY_KEYS = frozenset(
    {
        "client",
        "protocol",
        "listen_port",
        "listen_port_start",
        "listen_port_end",
        "targets",
        "sni_pattern",
        "proxy_protocol",
        "prefer_ipv6",
        "rate_limit",
        "health_check_interval_secs",
        "idle_timeout_secs",
    }
)
MAX_CLIENT_REF = 2 * MAX_NAME_LEN  # a client name or a client id
TARGET_KEYS = frozenset({"host", "port", "port_start", "port_end", "priority", "proxy_protocol"})


def _names(keys: list[str], shown: int = 5) -> str:
    """Unknown keys for a message: a few, each clipped (a body may hold thousands)."""
    text = ", ".join(clip(k, 40) for k in keys[:shown])
    return text + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ValidationError(f"validation.{key}", f"{key} must be a string", field=key)
    return value


def _listen(body: dict[str, Any]) -> tuple[tuple[int, int], str]:
    """``(lo, hi)`` and the field name to blame for range errors."""
    has_single = "listen_port" in body
    has_range = "listen_port_start" in body or "listen_port_end" in body
    if has_single and has_range:
        raise ValidationError(
            "validation.listen_port",
            "give listen_port or listen_port_start + listen_port_end, not both",
            field="listen_port",
        )
    if has_single:
        p = parse_port(body["listen_port"], "listen_port")
        return (p, p), "listen_port"
    if has_range:
        if "listen_port_start" not in body or "listen_port_end" not in body:
            raise ValidationError(
                "validation.listen_port",
                "a range needs both listen_port_start and listen_port_end",
                field="listen_port_start" if "listen_port_start" not in body else "listen_port_end",
            )
        lo = parse_port(body["listen_port_start"], "listen_port_start")
        hi = parse_port(body["listen_port_end"], "listen_port_end")
        if lo > hi:
            raise ValidationError(
                "validation.port_range",
                f"listen range {lo}-{hi} is reversed: listen_port_start must be <= listen_port_end",
                field="listen_port_start",
            )
        return (lo, hi), "listen_port_start"
    raise ValidationError(
        "validation.listen_port",
        "a rule needs listen_port, or listen_port_start + listen_port_end for a range",
        field="listen_port",
    )


def _target(item: Any, i: int) -> Target:
    where = f"targets[{i}]"
    if not isinstance(item, dict):
        raise ValidationError(
            "validation.targets", f"{where} must be an object {{host, port}}", field=where
        )
    unknown = sorted(set(item) - TARGET_KEYS)
    if unknown:
        raise ValidationError(
            "validation.targets", f"{where} has unknown key(s): {_names(unknown)}", field=where
        )
    host = item.get("host")
    if not isinstance(host, str):
        raise ValidationError(
            "validation.target_host", f"{where}.host must be a string", field=f"{where}.host"
        )
    if "port" in item and ("port_start" in item or "port_end" in item):
        raise ValidationError(
            "validation.targets",
            f"{where}: give port or port_start + port_end, not both",
            field=where,
        )
    if "port" in item:
        lo = hi = parse_port(item["port"], f"{where}.port")
    elif "port_start" in item and "port_end" in item:
        lo = parse_port(item["port_start"], f"{where}.port_start")
        hi = parse_port(item["port_end"], f"{where}.port_end")
        if lo > hi:
            raise ValidationError(
                "validation.port_range",
                f"{where}: port_start must be <= port_end",
                field=f"{where}.port_start",
            )
    else:
        raise ValidationError(
            "validation.targets", f"{where} needs port, or port_start + port_end", field=where
        )
    prio = PRIORITY.check(item.get("priority", 1), f"{where}.priority", "validation.priority")
    pp = item.get("proxy_protocol")
    if pp is not None and not isinstance(pp, str):
        raise ValidationError(
            "validation.proxy_protocol",
            f'{where}.proxy_protocol must be "v1" or "v2"',
            field=f"{where}.proxy_protocol",
        )
    return Target(
        host=validate_host(host, f"{where}.host"),
        port=lo,
        port_end=hi if hi != lo else None,
        priority=prio,
        proxy_protocol=pp,
    )


def parse_rule_body(body: Any, range_max_ports: int) -> tuple[Rule, str]:
    """Validate a push body; return the rule (``id`` "0", ``client`` unresolved)
    and the client reference (a name or an id; default ``local``)."""
    if not isinstance(body, dict):
        raise ValidationError("validation.body", "the rule body must be a JSON object")
    unknown = sorted(set(body) - BODY_KEYS)
    if unknown:
        raise ValidationError(
            "validation.unknown_field",
            f"unknown rule field(s): {_names(unknown)}; known: {', '.join(sorted(BODY_KEYS))}",
            field=clip(unknown[0]),
        )
    client = body.get("client", "local")
    if isinstance(client, int) and not isinstance(client, bool):
        client = str(client)  # a client named "7" typed without quotes
    if not isinstance(client, str) or not client.strip() or len(client) > MAX_CLIENT_REF:
        raise ValidationError(
            "validation.client",
            f"client must be a client name or id (at most {MAX_CLIENT_REF} characters)",
            field="client",
        )
    protocol = body.get("protocol", "tcp")
    if not isinstance(protocol, str):
        raise ValidationError(
            "validation.protocol", 'protocol must be "tcp" or "udp"', field="protocol"
        )
    listen, listen_field = _listen(body)
    raw_targets = body.get("targets")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise ValidationError(
            "validation.targets",
            "targets must be a non-empty list of {host, port, priority}",
            field="targets",
        )
    targets = [_target(t, i) for i, t in enumerate(raw_targets)]
    prefer_ipv6 = body.get("prefer_ipv6", False)
    if not isinstance(prefer_ipv6, bool):
        raise ValidationError(
            "validation.prefer_ipv6", "prefer_ipv6 must be true or false", field="prefer_ipv6"
        )
    rate_limit = body.get("rate_limit")
    if rate_limit is not None and not isinstance(rate_limit, dict):
        raise ValidationError(
            "validation.rate_limit", "rate_limit must be an object", field="rate_limit"
        )
    interval = HEALTH_CHECK_INTERVAL.check(
        body.get("health_check_interval_secs", 5.0), "health_check_interval_secs"
    )
    try:
        rule = build_rule(
            id="0",
            protocol=protocol.lower(),
            listen=listen,
            targets=targets,
            sni=_opt_str(body, "sni_pattern"),
            proxy_protocol=_opt_str(body, "proxy_protocol"),
            prefer_ipv6=prefer_ipv6,
            rate_limit=rate_limit,
            health_check_interval_secs=interval,
            range_max_ports=range_max_ports,
            idle_timeout_secs=body.get("idle_timeout_secs"),
        )
    except PortunusError as exc:
        if exc.details.get("field") == "listen":
            exc.details["field"] = listen_field
        raise
    return rule, client.strip()


def parse_rate_limit_update(params: dict[str, Any]) -> dict[str, int] | None:
    """``rules.update`` takes ``{id, rate_limit}`` only; everything else about a rule
    is immutable (remove and push again)."""
    other = sorted(set(params) - {"id", "rate_limit"})
    if other:
        raise ValidationError(
            "validation.immutable_field",
            f"only rate_limit can be changed on a rule; {', '.join(other)} cannot "
            "(remove the rule and push it again)",
            field=other[0],
        )
    if "rate_limit" not in params:
        raise ValidationError("validation.rate_limit", "rate_limit is required", field="rate_limit")
    raw = params["rate_limit"]
    if raw is not None and not isinstance(raw, dict):
        raise ValidationError(
            "validation.rate_limit", "rate_limit must be an object or null", field="rate_limit"
        )
    return validate_rate_limit(raw)
