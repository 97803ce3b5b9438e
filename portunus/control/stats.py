"""Rule counters read from the shards' multiprocess files, and the rule-state gauge.

The shards already write every counter into ``PROMETHEUS_MULTIPROC_DIR`` for
/metrics; ``rules.stats`` reads the same files with the same
``MultiProcessCollector`` instead of inventing a second aggregation channel.
Counters from every shard (live or dead) are summed; the ``portunus_detail_*``
series give the per-port and per-target rows that /metrics does not export.

prometheus_client is imported inside the functions: its value class is chosen at
import time from PROMETHEUS_MULTIPROC_DIR, which the supervisor sets before it
forks us — importing it at module import could freeze the wrong choice.
"""

from __future__ import annotations

import asyncio
import warnings
from collections import OrderedDict, defaultdict
from typing import Any

from portunus.logs import log_event
from portunus.metrics import catalog as c
from portunus.rules import Rule
from portunus.text import is_ascii_digits

RULE_SERIES = c.RULE_FIELDS
PORT_SERIES = c.PORT_FIELDS
TARGET_SERIES = c.TARGET_FIELDS
TARGET_UP = c.TARGET_UP.name
STATES = ("pending", "active", "failed", "draining", "revoked")


def _samples(metrics_dir: str) -> list[Any]:
    from portunus.metrics.per_rule import counter_samples

    return counter_samples(metrics_dir)


def rule_stats(
    metrics_dir: str, rule: Rule, per_port: bool = False, per_target: bool = False
) -> dict[str, Any]:
    """Totals for one rule (labels ``rule`` = its id); blocking file reads, so the
    caller runs it in a thread."""
    totals: dict[str, float] = dict.fromkeys(RULE_SERIES.values(), 0.0)
    ports: dict[int, dict[str, float]] = defaultdict(
        lambda: dict.fromkeys(PORT_SERIES.values(), 0.0)
    )
    targets: dict[str, dict[str, float]] = defaultdict(
        lambda: dict.fromkeys(TARGET_SERIES.values(), 0.0)
    )
    up: dict[str, float] = {}
    for s in _samples(metrics_dir):
        if s.labels.get("rule") != rule.id:
            continue
        if s.name in RULE_SERIES:
            totals[RULE_SERIES[s.name]] += s.value
        elif per_port and s.name in PORT_SERIES and is_ascii_digits(s.labels.get("port", "")):
            ports[int(s.labels["port"])][PORT_SERIES[s.name]] += s.value
        elif per_target and s.name in TARGET_SERIES:
            targets[s.labels.get("target", "")][TARGET_SERIES[s.name]] += s.value
        elif per_target and s.name == TARGET_UP:
            # Up only if every shard that reports the target sees it up.
            label = s.labels.get("target", "")
            up[label] = min(up.get(label, s.value), s.value)
    out: dict[str, Any] = {"id": int(rule.id) if is_ascii_digits(rule.id) else rule.id}
    out.update({k: int(v) for k, v in totals.items()})
    if per_port:
        if rule.is_range or ports:
            rows = [{"port": p, **{k: int(v) for k, v in ports[p].items()}} for p in rule.ports]
        else:  # single-port rules have no detail series: the rule totals are the port's
            rows = [
                {"port": rule.listen_start, **{k: int(totals[k]) for k in PORT_SERIES.values()}}
            ]
        out["per_port"] = rows
    if per_target:
        out["per_target"] = [
            {
                "target": t.label,
                "priority": t.priority,
                "up": (up[t.label] >= 1) if t.label in up else None,
                **{k: int(v) for k, v in targets[t.label].items()},
            }
            for t in rule.targets
        ]
    return out


def rule_totals(metrics_dir: str) -> dict[str, tuple[int, int, int]]:
    """``rule id -> (bytes_in, bytes_out, connections_total)`` for every local rule
    in one pass over the files (the traffic sampler reads all rules at once)."""
    index = {"bytes_in": 0, "bytes_out": 1, "connections_total": 2}
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for s in _samples(metrics_dir):
        key = RULE_SERIES.get(s.name)
        if key in index and "rule" in s.labels:
            sums[s.labels["rule"]][index[key]] += s.value
    return {rule: (int(v[0]), int(v[1]), int(v[2])) for rule, v in sums.items()}


class RuleStateGauge:
    """``portunus_rule_state{client,rule,owner,state}``: 1 for the current state, 0
    for the others, written by the control process on every state change.

    ``livemostrecent``: only the control process writes it, so each label set has
    one writer; *live* makes the supervisor's ``mark_process_dead`` drop a dead
    control process's file (its successor republishes every rule on sync), and
    *mostrecent* lets the newest value win if an old and a new control file
    briefly coexist — ``livemax`` would then report 1 for two states at once.
    A removed rule is written as 0 for every state, then its children are
    dropped: ``store.maybe_compact`` takes its rows out of control's file once
    enough removed rules have piled up.

    Inside a running event loop a state is written by a task a moment later, at most
    ``CHUNK`` rules per loop turn (the latest state of each rule wins): a new series
    costs ~80 µs (five prometheus children, each a key in control's mmap file), so
    after a restart the first sync of 30,000 rules held the loop for seconds, ahead
    of every other client's handshake and sync.  Without a loop it writes at once.
    """

    CHUNK = 200

    def __init__(self) -> None:
        self._gauge = c.RULE_STATE.gauge(registry=None)
        # rule id -> (client, owner, state) as last written by this process: every
        # (re)connect of an edge client re-syncs its rules and reports their states,
        # which after a restart are almost all unchanged; five ``labels().set()`` each
        # (~17 µs a rule with the children made) for nothing, 30,000 rules at a time.
        self._written: dict[str, tuple[str, str, str]] = {}
        self._pending: OrderedDict[str, tuple[Rule, str | None]] = OrderedDict()
        self._flusher: asyncio.Task[None] | None = None

    def __call__(self, rule: Rule, state: str | None) -> None:
        if (
            state is not None
            and rule.id not in self._pending
            and self._written.get(rule.id) == (rule.client, rule.owner, state)
        ):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(rule, state)
            return
        self._pending[rule.id] = (rule, state)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="rule-state-gauge")

    async def _flush(self) -> None:
        while self._pending:
            for _ in range(min(self.CHUNK, len(self._pending))):
                _, (rule, state) = self._pending.popitem(last=False)
                try:
                    self._write(rule, state)
                except Exception as exc:  # noqa: BLE001 - a metric must not stop control
                    log_event("metrics.rule_state_failed", level="error", error=repr(exc))
            await asyncio.sleep(0)

    def _write(self, rule: Rule, state: str | None) -> None:
        if state is not None:
            now = (rule.client, rule.owner, state)
            if self._written.get(rule.id) == now:
                return
            self._written[rule.id] = now
        else:
            self._written.pop(rule.id, None)
        for s in STATES:
            self._gauge.labels(rule.client, rule.id, rule.owner, s).set(1.0 if s == state else 0.0)
        if state is None:
            # The zeros stay in the file until it is compacted; the in-process
            # children would otherwise pile up for every rule ever pushed.
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", UserWarning
                )  # "not implemented in multi-process mode"
                self._gauge.remove_by_labels({"client": rule.client, "rule": rule.id})
            from portunus.metrics import store

            store.retire_rule(rule.client, rule.id)
            store.maybe_compact()
