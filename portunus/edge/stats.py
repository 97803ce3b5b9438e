"""Per-rule counters for the ``stats`` frames, read from the client's multiprocess dir.

The shards already write every counter into ``PROMETHEUS_MULTIPROC_DIR`` for
/metrics; this is the same read ``portunus.control.stats.rule_stats`` does for
one rule, done in one pass for all of a client's rules (a client may carry many,
and the frame goes out every few seconds).  Blocking file reads: run it in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from portunus.control.stats import RULE_SERIES

Totals = dict[str, int]


def rule_totals(metrics_dir: str, rule_ids: Iterable[str]) -> dict[str, Totals]:
    """``{rule id: {bytes_in, bytes_out, connections_total, active_connections}}`` for
    every id given (zeros for a rule no shard has counted yet)."""
    wanted = {str(r) for r in rule_ids}
    sums: dict[str, dict[str, float]] = {
        rid: dict.fromkeys(RULE_SERIES.values(), 0.0) for rid in wanted
    }
    if not wanted or not os.path.isdir(metrics_dir):
        return {rid: {k: int(v) for k, v in row.items()} for rid, row in sums.items()}
    # Imported here: prometheus_client picks its value class from the environment at import.
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    for family in registry.collect():
        for s in family.samples:
            key = RULE_SERIES.get(s.name)
            if key is None:
                continue
            row = sums.get(s.labels.get("rule", ""))
            if row is not None:
                row[key] += s.value
    return {rid: {k: int(v) for k, v in row.items()} for rid, row in sums.items()}
