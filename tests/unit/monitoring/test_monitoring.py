"""The shipped Prometheus alert rules and Grafana dashboard (packaging/monitoring/):
valid for promtool, alerts that fire on trouble and only then (alerts_test.yml),
and only metric names the catalog (portunus/metrics/catalog.py) exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from portunus.metrics.catalog import CATALOG

REPO = Path(__file__).resolve().parents[3]
MONITORING = REPO / "packaging" / "monitoring"
ALERTS = MONITORING / "portunus-alerts.yml"
DASHBOARD = MONITORING / "portunus-dashboard.json"
METRIC = re.compile(r"\bportunus_[a-z_]+\b")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run installs it)")
    return found


def _exported_metrics() -> set[str]:
    """Every series of the catalog, minus the portunus_detail_* ones /metrics hides
    (rule-stats only)."""
    return {m.name for m in CATALOG if m.exported}


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_promtool_check_rules() -> None:
    res = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 4 rules found" in res.stdout, res.stdout


def test_alerts_fire_on_trouble_only() -> None:
    """promtool's rule unit tests: each alert's series, timing, labels and text."""
    res = subprocess.run(
        [_promtool(), "test", "rules", str(Path(__file__).with_name("alerts_test.yml"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_four_alerts_exist() -> None:
    text = ALERTS.read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)", text, re.M)
    assert alerts == [
        "PortunusRuleFailed",
        "PortunusClientOffline",
        "PortunusTargetDown",
        "PortunusShardRestarts",
    ]


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    exported = _exported_metrics()
    assert {
        "portunus_rule_state",
        "portunus_target_up",
        "portunus_clients_connected",
        "portunus_shard_restarts_total",
    } <= exported  # the scan itself works
    used = set(METRIC.findall(ALERTS.read_text().split("groups:", 1)[1]))
    for expr in _dashboard_exprs():
        used |= set(METRIC.findall(expr))
    assert used - exported == set(), f"not exported by the code: {sorted(used - exported)}"
    # The dashboard shows every exported series somewhere.
    assert exported - used == set(), f"exported but on no panel: {sorted(exported - used)}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, as a recording rule:
    promtool parses it as PromQL."""
    exprs = _dashboard_exprs()
    assert exprs
    rules = tmp_path / "dashboard-rules.yml"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        concrete = (
            expr.replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$client", ".*")
        )
        assert "$" not in concrete, expr
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(concrete)}"]
    rules.write_text("\n".join(lines) + "\n")
    res = subprocess.run(
        [_promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard_is_importable_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "portunus" and doc["title"] == "Portunus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert variables == {"datasource", "instance", "client"}
    for p in doc["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
