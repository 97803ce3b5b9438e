"""Smoke tests of the SNI and failover benchmarks (bench/sni.py, bench/failover.py).

Run with ``.venv/bin/python -m pytest bench/test_feature_benches.py -m "slow or not slow"``;
the end-to-end ones start Portunus and are marked slow (a few seconds each), the
rest are pure and fast.
"""

from __future__ import annotations

import re
import tempfile
import urllib.request
from pathlib import Path

import pytest

from bench.common import LOOPBACK, services, wait_for
from bench.failover import Attempt, Origins, Timeline, analyse, run_scenario, start_contender
from bench.report import targets
from bench.results import BenchResult, Metric
from bench.sni import (
    RAW_NAME,
    TLS_NAME,
    client_hello,
    portunus_sni_toml,
    raw_flow,
    start_portunus_sni,
    start_sink,
    tls_flow,
)


def test_client_hello_is_one_record_naming_the_server() -> None:
    hello = client_hello(RAW_NAME)
    assert hello[0] == 0x16 and hello[5] == 0x01  # handshake record, ClientHello
    assert int.from_bytes(hello[3:5], "big") == len(hello) - 5
    assert RAW_NAME.encode() in hello


def test_portunus_sni_toml_shares_one_port() -> None:
    text = portunus_sni_toml({"plain_tls": 1, "plain_raw": 2, "sni": 3}, (10, 11), 9)
    assert text.count("listen_port = 3\n") == 2
    assert f'sni = "{TLS_NAME}"' in text and f'sni = "{RAW_NAME}"' in text
    assert text.count("sni = ") == 2


def _attempt(start: float, tag: str) -> Attempt:
    return Attempt(start, start + 0.001, tag, "" if tag else "closed")


def test_analyse_counts_the_first_second_after_the_kill() -> None:
    attempts = [_attempt(0.5, "P"), _attempt(1.0, ""), _attempt(1.2, "B"), _attempt(1.5, "B"),
                _attempt(2.5, "B"), _attempt(4.1, "B"), _attempt(4.3, "P")]  # fmt: skip
    s = analyse(attempts, {"kill": 1.0, "dead": 1.1, "restart": 4.0}, Timeline(1, 3, 1))
    assert s["ok_first_s_pct"] == pytest.approx(200 / 3)  # 1.0 failed, 1.2 and 1.5 ok
    assert s["ok_first_s_after_exit_pct"] == 100.0
    assert s["failed"] == 1 and s["pre_on_primary_pct"] == 100.0
    assert s["first_backup_ms"] == pytest.approx(201.0)
    assert s["return_first_ms"] == pytest.approx(301.0)
    assert s["return_all_ms"] == pytest.approx(100.0)


def _bench(name: str, results: dict[str, list[dict[str, float]] | str], key: str) -> dict:
    return BenchResult(name, "t", "m", [Metric(key, "k", True)], results).as_dict()  # type: ignore[arg-type]


def test_targets_for_sni_and_failover() -> None:
    benches = {
        "sni_tls": _bench("sni_tls", {"portunus": [{"gbps": 9.0}],
                                      "portunus-plain": [{"gbps": 10.0}]}, "gbps"),
        "sni_raw": _bench("sni_raw", {"portunus": [{"gbps": 8.0}],
                                      "portunus-plain": [{"gbps": 10.0}]}, "gbps"),
        "failover": _bench("failover", {"portunus": [{"ok_first_s_pct": 98.0},
                                                     {"ok_first_s_pct": 99.5},
                                                     {"ok_first_s_pct": 100.0}]},
                           "ok_first_s_pct"),
    }  # fmt: skip
    rows = {t["target"]: t for t in targets(benches)}
    sni_rows = [r for k, r in rows.items() if k.startswith("SNI-routed")]
    assert [r["status"] for r in sni_rows] == ["PASS", "FAIL"]  # 0.90× tls, 0.80× raw
    fo = next(r for k, r in rows.items() if k.startswith("failover"))
    assert fo["status"] == "PASS" and "worst round 98.00 %" in fo["value"]


@pytest.mark.slow
def test_sni_flows_through_portunus_are_routed_by_name() -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-sni-test-"))
    with services() as started:
        sink, tls_port, raw_port = start_sink(log_dir)
        started.append(sink)
        svc, ports = start_portunus_sni((tls_port, raw_port), log_dir)
        started.append(svc)
        assert tls_flow(ports["sni"], 20_000_000, 20) > 0
        assert raw_flow(ports["sni"], 20_000_000, 20) > 0
        assert raw_flow(ports["plain_raw"], 20_000_000, 20) > 0
        toml = next(log_dir.glob("portunus-sni-*.toml")).read_text()
        metrics_port = re.search(r'metrics_listen = "[\d.]+:(\d+)"', toml).group(1)  # type: ignore[union-attr]
        url = f"http://{LOOPBACK}:{metrics_port}/metrics"
        assert wait_for(lambda: _exact_routes(url) == {"sni-tls": 1.0, "sni-raw": 1.0}, 5)


def _exact_routes(url: str) -> dict[str, float]:
    """{rule: value} of portunus_tls_sni_route_total{result="exact"}."""
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        lines = resp.read().decode().splitlines()
    out: dict[str, float] = {}
    for line in lines:
        if line.startswith("portunus_tls_sni_route_total{") and 'result="exact"' in line:
            rule = re.search(r'rule="([^"]+)"', line)
            if rule:
                out[rule.group(1)] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.slow
def test_failover_scenario_through_portunus() -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-failover-test-"))
    with services() as started:
        origins = Origins(log_dir, started)
        origins.start()
        ep = start_contender("portunus", origins, log_dir)
        assert ep.service is not None
        started.append(ep.service)
        s = run_scenario(ep.port, origins, Timeline(0.5, 1.0, 3.0), 100)
    assert s["pre_on_primary_pct"] == 100.0
    assert s["first_backup_ms"] >= 0  # the backup served someone after the kill
    assert s["return_first_ms"] >= 0  # and the primary came back
    assert s["ok_pct"] > 90.0
