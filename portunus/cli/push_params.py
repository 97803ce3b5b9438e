"""What ``push-rule`` sends: its arguments turned into the ``rules.push`` params.

The same body the HTTP API takes (``POST /v1/rules``), so the CLI and the API
cannot drift; kept apart from the verb so it can be tested without click.
"""

from __future__ import annotations

from typing import Any

import click

from portunus.bounds import RATE_LIMIT_VALUE
from portunus.cli.numbers import BoundedNumber
from portunus.errors import ValidationError
from portunus.rules import Target, parse_port_range, parse_target
from portunus.schema.generate import schema
from portunus.schema.rule import MAX_TARGETS, RATE_LIMIT_ALL_KEYS


def _target_entry(t: Target) -> dict[str, Any]:
    """HTTP-shaped target: ``{host, port}``, or ``{host, port_start, port_end}`` for ranges."""
    if t.port_end is not None:
        return {
            "host": t.host,
            "port_start": t.port,
            "port_end": t.port_end,
            "priority": t.priority,
        }
    return {"host": t.host, "port": t.port, "priority": t.priority}


def build_push_params(
    *,
    client: str,
    listen: str,
    target: str | None,
    targets: tuple[str, ...] = (),
    protocol: str = "tcp",
    sni: str | None = None,
    proxy_protocol: str | None = None,
    prefer_ipv6: bool = False,
    rate_limit: dict[str, int | None] | None = None,
    health_check_interval_secs: float | None = None,
    ack_timeout: float = 2.0,
    idle_timeout_secs: float | None = None,
) -> dict[str, Any]:
    """The ``rules.push`` params for push-rule's arguments.

    Only syntax is checked here (ports, host:port@prio, at most 8 targets); the
    cross-field rules (range lengths, SNI on ranges, range size) are the server's,
    because only it knows its ``range_rule_max_ports``.  Optional keys are sent only
    when given, so the server's defaults apply.
    """
    lo, hi = parse_port_range(listen, "LISTEN")
    parsed = [parse_target(target, "TARGET")] if target else []
    parsed += [parse_target(t, "--target") for t in targets]
    if not parsed:
        raise ValidationError(
            "validation.targets",
            "give a TARGET (host:port) or at least one --target host:port@prio",
            field="targets",
        )
    if len(parsed) > MAX_TARGETS:
        raise ValidationError(
            "validation.targets",
            f"a rule takes at most {MAX_TARGETS} targets, got {len(parsed)}",
            field="targets",
        )
    params: dict[str, Any] = {"client": client, "protocol": protocol}
    if lo == hi:
        params["listen_port"] = lo
    else:
        params["listen_port_start"], params["listen_port_end"] = lo, hi
    params["targets"] = [_target_entry(t) for t in parsed]
    if sni is not None:
        params["sni_pattern"] = sni
    if proxy_protocol is not None:
        params["proxy_protocol"] = proxy_protocol
    if prefer_ipv6:
        params["prefer_ipv6"] = True
    caps = {k: v for k, v in (rate_limit or {}).items() if v is not None}
    if caps:
        params["rate_limit"] = caps
    if health_check_interval_secs is not None:
        params["health_check_interval_secs"] = health_check_interval_secs
    if idle_timeout_secs is not None:
        params["idle_timeout_secs"] = idle_timeout_secs
    params["ack_timeout"] = ack_timeout
    return params


def rate_limit_options(f: Any) -> Any:
    """The ``--<cap>`` and ``--<cap>-burst`` options of push-rule, one per key of the
    ``RateLimit`` declaration, with its description as the help text."""
    described = schema("RateLimit")["properties"]
    for key in reversed(RATE_LIMIT_ALL_KEYS):
        flag = "--" + key.replace("_", "-")
        if key.endswith("_burst"):
            text = f"Burst allowed above {flag.removesuffix('-burst')}."
        else:
            text = f"{described[key].get('description', 'Cap')} (rate_limit.{key})."
        f = click.option(
            flag, key, type=BoundedNumber(RATE_LIMIT_VALUE), default=None, metavar="N", help=text
        )(f)
    return f
