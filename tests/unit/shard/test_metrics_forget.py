"""A drained rule's label children leave the shard's memory and, once compacted,
its multiprocess files (rule churn must not grow a shard for the life of the
process)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector

from portunus.metrics import store
from portunus.shard import metrics as m


def _rules_in(metric: object) -> set[str]:
    return {s.labels["rule"] for fam in metric.collect() for s in fam.samples}  # type: ignore[attr-defined]


def test_forget_rule_drops_every_series_of_that_rule_only() -> None:
    m.RuleMeters("local", "forget-a", "").bytes_in.inc(3)
    m.RuleMeters("local", "forget-b", "").bytes_in.inc(1)
    m.PortMeters("local", "forget-a", 8080).connections.inc()
    m.TARGET_UP.labels("local", "forget-a", "h:1").set(1)
    m.forget_rule("local", "forget-a")
    for metric in (m.BYTES_IN, m.PORT_CONNECTIONS, m.TARGET_UP):
        assert "forget-a" not in _rules_in(metric), metric
    assert "forget-b" in _rules_in(m.BYTES_IN)
    m.forget_rule("local", "forget-b")
    m.forget_rule("local", "never-existed")  # no error


@pytest.fixture
def mp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Multiprocess mode with the compacting store, as a shard runs (restored after)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(store, "_state", store._State())
    monkeypatch.setattr(values, "ValueClass", store.CompactingValue)
    return tmp_path


def test_forgotten_rules_leave_the_shards_files_and_kept_rules_keep_counting(
    mp_dir: Path,
) -> None:
    """Rule churn: every rule pushed and removed leaves no series behind once the
    files are compacted, and a rule that stays keeps its exact counters."""
    stay = m.RuleMeters("local", "stay", "")
    stay.bytes_in.inc(1000)
    lingering = []
    churned = store.MIN_DEAD + 44  # enough for each file (one target_up per rule)
    for i in range(churned):
        meters = m.RuleMeters("local", f"churn-{i}", "")
        meters.bytes_in.inc(10)
        m.PortMeters("local", f"churn-{i}", 9000).bytes_in.inc(10)
        m.TARGET_UP.labels("local", f"churn-{i}", "h:1").set(1)
        m.RATE_LIMIT_REFUSED.labels("local", f"churn-{i}", "", "concurrent_connections").inc()
        lingering.append(meters)  # a drained runtime in a reference cycle, not yet collected
        m.forget_rule("local", f"churn-{i}")
        stay.bytes_in.inc(1)
    store.maybe_compact(now=1e9)
    assert {r for _, r in _on_file(mp_dir)} == {"stay"}
    assert _on_file(mp_dir)[("portunus_rule_bytes_in_total", "stay")] == 1000 + churned
    stay.bytes_in.inc(1)
    assert _on_file(mp_dir)[("portunus_rule_bytes_in_total", "stay")] == 1001 + churned


def _on_file(path: Path) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return {
        (s.name, s.labels.get("rule", "")): s.value
        for fam in registry.collect()
        for s in fam.samples
    }
