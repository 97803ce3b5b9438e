"""The supervisor's rule table: what is bound, and what every shard must be told.

``RuleBook.apply`` turns a change of desired rules into (a) per-rule results —
active, or failed with the operator-facing reason — and (b) a ``Delta`` that the
arbiter fans out to every shard in a fixed order: new listening fds, then the
rules message, then listeners nobody needs any more.  Binding happens here,
synchronously, so "active" means the ports are bound and listening: the kernel
queues connections from that instant even before a shard picks them up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from portunus.logs import log_event
from portunus.rules import Rule
from portunus.supervisor.listeners import BindError, ListenerTable


@dataclass
class Delta:
    new_keys: list[str] = field(default_factory=list)
    gone_keys: list[str] = field(default_factory=list)
    upsert: list[Rule] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.new_keys or self.gone_keys or self.upsert or self.remove)


Result = dict[str, Any]


class RuleBook:
    def __init__(self, listeners: ListenerTable) -> None:
        self.listeners = listeners
        self.rules: dict[str, Rule] = {}
        self.failed: dict[str, str] = {}  # id -> reason, for status and stats
        self.failed_rules: dict[str, Rule] = {}  # id -> the rule, to retry its binding

    def apply(
        self, upsert: list[Rule], remove: list[str], *, quiet_failures: bool = False
    ) -> tuple[dict[str, Result], Delta]:
        delta = Delta()
        results: dict[str, Result] = {}
        for rid in remove:
            self.failed.pop(rid, None)
            self.failed_rules.pop(rid, None)
            self._drop(rid, delta)
        for rule in upsert:
            old = self.rules.get(rule.id)
            if old is not None and old == rule:
                results[rule.id] = {"state": "active", "reason": None}
                continue
            if old is not None and old.binding() == rule.binding():
                self.rules[rule.id] = rule
                delta.upsert.append(rule)
                results[rule.id] = {"state": "active", "reason": None}
                continue
            if old is not None:
                # New ports: drain the old incarnation, bind the new one.
                self._drop(rule.id, delta)
            try:
                keys = self.listeners.acquire(rule)
            except BindError as exc:
                self.failed[rule.id] = exc.reason
                self.failed_rules[rule.id] = rule
                results[rule.id] = {"state": "failed", "reason": exc.reason}
                log_event(
                    "rule.failed",
                    level="debug" if quiet_failures else "error",
                    rule=rule.id,
                    reason=exc.reason,
                )
                continue
            self.failed.pop(rule.id, None)
            self.failed_rules.pop(rule.id, None)
            self.rules[rule.id] = rule
            delta.new_keys.extend(keys)
            delta.upsert.append(rule)
            results[rule.id] = {"state": "active", "reason": None}
            log_event(
                "rule.activated",
                rule=rule.id,
                protocol=rule.protocol,
                listen=_listen(rule),
                targets=[t.label for t in rule.targets],
            )
        # A key released and re-bound in one apply is "new" (fresh socket), not gone.
        delta.gone_keys = [k for k in delta.gone_keys if k not in set(delta.new_keys)]
        return results, delta

    def sync(self, desired: list[Rule]) -> tuple[dict[str, Result], Delta]:
        """Make the table equal to ``desired``; unchanged rules are untouched."""
        ids = {r.id for r in desired}
        remove = [rid for rid in self.rules if rid not in ids]
        for rid in [f for f in self.failed if f not in ids]:
            self.failed.pop(rid, None)
            self.failed_rules.pop(rid, None)
        return self.apply(desired, remove)

    def _drop(self, rid: str, delta: Delta) -> None:
        rule = self.rules.pop(rid, None)
        if rule is None:
            return
        delta.remove.append(rid)
        delta.gone_keys.extend(self.listeners.release(rule))
        log_event("rule.removed", rule=rid)


def _listen(rule: Rule) -> str:
    return str(rule.listen_start) if not rule.is_range else f"{rule.listen_start}-{rule.listen_end}"
