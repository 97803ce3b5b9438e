"""What ``rules.update`` (PUT /v1/rules/{id}, ``update-rule``) may change in place.

A rule keeps its id, its listener and its open connections; only what a shard can
swap under live traffic may change: ``rate_limit`` (caps) and ``targets`` — the
``RuleUpdate`` declaration (``portunus.schema.rule``), whose unknown keys are
``validation.immutable_field``.  New targets are validated against the rule as it
stands (range mapping, priorities, PROXY protocol on TCP only, at most 8) by the
same ``build_rule`` every push goes through.  Open connections keep the target
they were connected to; new ones use the new list (the shard swaps the rule's
runtime, the listener never closes).
"""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

from portunus.control.rule_body import target_from_body
from portunus.errors import ValidationError
from portunus.rules import Rule, Target, build_rule
from portunus.schema.check import validate
from portunus.schema.rule import RuleUpdate


def parse_rule_update(params: dict[str, Any], current: Rule) -> dict[str, Any]:
    """``{"rate_limit": caps or None}`` and/or ``{"targets": [Target]}`` from the
    params; every other field is immutable (remove the rule and push it again)."""
    update = validate({k: v for k, v in params.items() if k != "id"}, RuleUpdate)
    changes: dict[str, Any] = {}
    if update.rate_limit is not UNSET:
        rate_limit = update.rate_limit
        changes["rate_limit"] = rate_limit.caps() if rate_limit is not None else None
    if update.targets is not UNSET:
        targets = [target_from_body(t, i) for i, t in enumerate(update.targets)]
        changes["targets"] = checked_targets(current, targets)
    if not changes:
        raise ValidationError(
            "validation.rate_limit", "give rate_limit and/or targets to change", field="rate_limit"
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
