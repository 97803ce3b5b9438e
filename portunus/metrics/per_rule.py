"""Per-rule counters read from a node's multiprocess dir: the edge client's ``stats``
frames and the server's carried totals (control/counters.py) use it.

The shards already write every counter into ``PROMETHEUS_MULTIPROC_DIR`` for
/metrics; this is the read ``portunus.control.stats.rule_stats`` does for one
rule, done in one pass for all of a client's rules (a client may carry many, and
the frame goes out every few seconds).  Besides the four totals, an entry carries
the optional ``per_port`` / ``per_target`` rows of docs/edge.md ("Server notes")
when the shards wrote detail series for it, so ``rule-stats --per-port/--per-target``
work for edge rules too.  Blocking file reads: run it in a thread.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from portunus.metrics import catalog as c
from portunus.text import is_ascii_digits


class _Acc:
    __slots__ = ("totals", "ports", "targets", "up")

    def __init__(self) -> None:
        self.totals: dict[str, float] = dict.fromkeys(c.RULE_FIELDS.values(), 0.0)
        self.ports: dict[int, dict[str, float]] = defaultdict(
            lambda: dict.fromkeys(c.PORT_FIELDS.values(), 0.0)
        )
        self.targets: dict[str, dict[str, float]] = defaultdict(
            lambda: dict.fromkeys(c.TARGET_FIELDS.values(), 0.0)
        )
        self.up: dict[str, float] = {}

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: int(v) for k, v in self.totals.items()}
        if self.ports:
            out["per_port"] = [
                {"port": p, **{k: int(v) for k, v in row.items()}}
                for p, row in sorted(self.ports.items())
            ]
        labels = sorted(set(self.targets) | set(self.up))
        if labels:
            out["per_target"] = [
                {
                    "target": t,
                    **{k: int(v) for k, v in self.targets[t].items()},
                    # Up only if every shard that reports the target sees it up.
                    "up": (self.up[t] >= 1) if t in self.up else None,
                }
                for t in labels
            ]
        return out


# Files of gauges in "livemostrecent" mode hold no per-rule counter: only the server's
# control process writes them (portunus_rule_state, 5 series per rule: 150,000 on a
# 30,000-rule fleet; portunus_clients_connected).  Parsing them for counters cost the
# control process a core-second per read during a reconnect storm.
_NO_COUNTERS = "gauge_livemostrecent_"


def counter_files(metrics_dir: str) -> list[str]:
    """The multiprocess files that may hold per-rule counters (every ``*.db`` that
    ``MultiProcessCollector`` would read, less the control process's state gauges)."""
    try:
        names = os.listdir(metrics_dir)
    except OSError:
        return []
    return [
        os.path.join(metrics_dir, n)
        for n in names
        if n.endswith(".db") and not n.startswith(_NO_COUNTERS)
    ]


def counter_samples(metrics_dir: str) -> list[Any]:
    """Every sample of ``counter_files`` (merged across processes, as /metrics does)."""
    files = counter_files(metrics_dir)
    if not files:
        return []
    # Imported here: prometheus_client picks its value class from the environment at import.
    from prometheus_client.multiprocess import MultiProcessCollector

    return [
        s for family in MultiProcessCollector.merge(files, accumulate=True) for s in family.samples
    ]


def rule_totals(metrics_dir: str, rule_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{rule id: {bytes_in, bytes_out, connections_total, active_connections,
    per_port?, per_target?}}`` for every id given (zeros for a rule no shard has
    counted yet)."""
    accs = {str(r): _Acc() for r in rule_ids}
    if accs:
        for s in counter_samples(metrics_dir):
            acc = accs.get(s.labels.get("rule", ""))
            if acc is None:
                continue
            if s.name in c.RULE_FIELDS:
                acc.totals[c.RULE_FIELDS[s.name]] += s.value
            elif s.name in c.PORT_FIELDS and is_ascii_digits(s.labels.get("port", "")):
                acc.ports[int(s.labels["port"])][c.PORT_FIELDS[s.name]] += s.value
            elif s.name in c.TARGET_FIELDS:
                acc.targets[s.labels.get("target", "")][c.TARGET_FIELDS[s.name]] += s.value
            elif s.name == c.TARGET_UP.name:
                label = s.labels.get("target", "")
                acc.up[label] = min(acc.up.get(label, s.value), s.value)
    return {rid: acc.entry() for rid, acc in accs.items()}
