"""``rule_totals`` over real multiprocess files written by two "shard" processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from portunus.metrics.per_rule import rule_totals

WRITER = """
from portunus.shard import metrics as m
m.BYTES_IN.labels("edge-01", "{rule}", "").inc({n})
m.BYTES_OUT.labels("edge-01", "{rule}", "").inc({n} * 2)
m.CONNECTIONS.labels("edge-01", "{rule}", "").inc(3)
m.ACTIVE.labels("edge-01", "{rule}", "").set(1)
m.BYTES_IN.labels("edge-01", "99", "").inc(5)
m.PORT_BYTES_IN.labels("edge-01", "{rule}", "30001").inc(7)
m.TARGET_CONNECTIONS.labels("edge-01", "{rule}", "127.0.0.1:9").inc(2)
m.TARGET_UP.labels("edge-01", "{rule}", "127.0.0.1:9").set({up})
"""


def _shard(metrics_dir: Path, rule: str, n: int, up: int = 1) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    subprocess.run(
        [sys.executable, "-c", WRITER.format(rule=rule, n=n, up=up)], env=env, check=True
    )


def test_sums_every_shard_for_the_rules_asked(tmp_path: Path) -> None:
    _shard(tmp_path, "7", 100)
    _shard(tmp_path, "7", 50, up=0)
    totals = rule_totals(str(tmp_path), ["7", "8"])
    assert totals["7"]["bytes_in"] == 150 and totals["7"]["bytes_out"] == 300
    assert totals["7"]["connections_total"] == 6
    assert totals["8"] == {
        "bytes_in": 0,
        "bytes_out": 0,
        "connections_total": 0,
        "active_connections": 0,
    }
    assert "99" not in totals  # only the client's current rules
    assert totals["7"]["per_port"] == [
        {
            "port": 30001,
            "bytes_in": 14,
            "bytes_out": 0,
            "connections_total": 0,
            "active_connections": 0,
        }
    ]
    # One shard sees the target down: it is not up.
    assert totals["7"]["per_target"] == [
        {"target": "127.0.0.1:9", "connections_total": 4, "connect_failures_total": 0, "up": False}
    ]
    assert "per_port" not in totals["8"] and "per_target" not in totals["8"]


def test_missing_dir_gives_zeros(tmp_path: Path) -> None:
    assert rule_totals(str(tmp_path / "none"), ["1"])["1"]["bytes_in"] == 0
    assert rule_totals(str(tmp_path), []) == {}


STATE_WRITER = """
from portunus.control.stats import RuleStateGauge
from portunus.rules import Target, build_rule
sink = RuleStateGauge()
for i in range(1, 201):
    sink(build_rule(id=str(i), protocol="tcp", listen=(1, 1), targets=[Target("127.0.0.1", 9)]), "active")
"""


def test_the_control_state_gauges_are_not_read_for_counters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule-state gauge (5 series per rule, written by control) holds no counter:
    reading counters must not parse it (150,000 series on a 30,000-rule fleet)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    from portunus.control import stats
    from portunus.metrics import per_rule

    _shard(tmp_path, "7", 100)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", STATE_WRITER], env=env, check=True)
    state_files = [p.name for p in tmp_path.iterdir() if p.name.startswith("gauge_livemostrecent_")]
    assert state_files  # the writer made one
    read: list[str] = []
    real = MultiProcessCollector.merge

    def spy(files: list[str], accumulate: bool = True) -> object:
        read.extend(os.path.basename(f) for f in files)
        return real(files, accumulate)

    monkeypatch.setattr(MultiProcessCollector, "merge", staticmethod(spy))
    assert per_rule.rule_totals(str(tmp_path), ["7"])["7"]["bytes_in"] == 100
    assert stats.rule_totals(str(tmp_path))["7"] == (100, 200, 3)
    assert read and not set(read) & set(state_files)
    assert {f for f in per_rule.counter_files(str(tmp_path))} == {
        str(p) for p in tmp_path.iterdir() if p.suffix == ".db" and p.name not in state_files
    }
