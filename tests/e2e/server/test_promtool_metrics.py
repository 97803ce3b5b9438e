"""A running server's /metrics, with traffic on a rule and a restarted shard, passes `promtool check
metrics` (Prometheus's own lint of the exposition format, names, types and help),
and carries the series the shipped alert rules and dashboard query."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest

from tests.e2e.support import echo, echo_roundtrip, wait_for

ALERTED = (
    "portunus_rule_state",
    "portunus_target_up",
    "portunus_shard_restarts_total",
    "portunus_clients_connected",
    "portunus_rule_bytes_in_total",
    "portunus_process_resident_memory_bytes",
)


def test_live_metrics_pass_promtool_check_metrics(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run installs it)")
    srv = server(shards=2)
    org = origin(echo)
    listen = ports.port()
    srv.cli_json("push-rule", "local", str(listen), org.address)
    assert echo_roundtrip(listen, b"x" * 4096)
    srv.wait_metrics(10)
    srv.shards()[0].kill()  # so portunus_shard_restarts_total has a series too
    wait_for(
        lambda: srv.scrape().value("portunus_shard_restarts_total", shard="0") == 1,
        10,
        what="portunus_shard_restarts_total{shard=0} == 1",
    )
    with urllib.request.urlopen(srv.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    samples = {
        line.split("{")[0].split()[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert set(ALERTED) - samples == set(), sorted(samples)
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr + "\n--- /metrics:\n" + text[:3000]
