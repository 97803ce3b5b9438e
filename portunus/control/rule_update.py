"""What ``rules.update`` (PUT /v1/rules/{id}, ``update-rule``) may change in place.

A rule keeps its id, its listener and its open connections; only what a shard can
swap under live traffic may change: ``rate_limit`` (caps) and ``targets``.  New
targets are validated against the rule as it stands (range mapping, priorities,
PROXY protocol on TCP only, at most 8) by the same ``build_rule`` every push goes
through.  Open connections keep the target they were connected to; new ones use
the new list (the shard swaps the rule's runtime, the listener never closes).
"""

from __future__ import annotations

from typing import Any

from portunus.control.rule_body import _target
from portunus.errors import ValidationError
from portunus.rules import Rule, Target, build_rule, validate_rate_limit

UPDATABLE = ("rate_limit", "targets")


def parse_rule_update(params: dict[str, Any], current: Rule) -> dict[str, Any]:
    """``{"rate_limit": caps or None}`` and/or ``{"targets": [Target]}`` from the
    params; every other field is immutable (remove the rule and push it again)."""
    other = sorted(set(params) - {"id", *UPDATABLE})
    if other:
        raise ValidationError(
            "validation.immutable_field",
            f"only {' and '.join(UPDATABLE)} can be changed on a rule; {', '.join(other)} cannot "
            "(remove the rule and push it again)",
            field=other[0],
        )
    if not any(k in params for k in UPDATABLE):
        raise ValidationError(
            "validation.rate_limit", "give rate_limit and/or targets to change", field="rate_limit"
        )
    changes: dict[str, Any] = {}
    if "rate_limit" in params:
        raw = params["rate_limit"]
        if raw is not None and not isinstance(raw, dict):
            raise ValidationError(
                "validation.rate_limit", "rate_limit must be an object or null", field="rate_limit"
            )
        changes["rate_limit"] = validate_rate_limit(raw)
    if "targets" in params:
        raw_targets = params["targets"]
        if not isinstance(raw_targets, list) or not raw_targets:
            raise ValidationError(
                "validation.targets",
                "targets must be a non-empty list of {host, port, priority}",
                field="targets",
            )
        changes["targets"] = checked_targets(
            current, [_target(t, i) for i, t in enumerate(raw_targets)]
        )
    return changes


def checked_targets(current: Rule, targets: list[Target]) -> tuple[Target, ...]:
    """The targets as ``current`` would hold them, or the push's validation error."""
    rule = build_rule(
        id=current.id,
        protocol=current.protocol,
        listen=(current.listen_start, current.listen_end),
        targets=targets,
        client=current.client,
        owner=current.owner,
        sni=current.sni,
        proxy_protocol=current.proxy_protocol,
        prefer_ipv6=current.prefer_ipv6,
        health_check_interval_secs=current.health_check_interval_secs,
        range_max_ports=current.listen_end - current.listen_start + 1,
    )
    return rule.targets
