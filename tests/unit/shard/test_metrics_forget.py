"""A drained rule's label children leave the shard's memory (rule churn must not
grow a shard for the life of the process)."""

from __future__ import annotations

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
