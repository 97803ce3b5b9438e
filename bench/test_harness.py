"""Tests of the harness itself (parsers, rounds, report, process cleanup).

Run with ``.venv/bin/python -m pytest bench/test_harness.py`` — kept out of tests/
because they test the benchmark tooling, not Portunus.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import psutil
import pytest

from bench.common import (
    StartError,
    is_listening,
    services,
    start_service,
    usable_cpus,
    wait_for,
)
from bench.forwarders import Endpoint, open_forwarders
from bench.latency import add_added_latency, parse_pingpong
from bench.report import render, targets
from bench.results import BenchResult, Metric
from bench.rounds import run_rounds, summarize
from bench.short_conn import parse_wrk
from bench.tcp_throughput import parse_iperf3
from bench.udp import origin_total

SOCKPERF_OUT = """\
sockperf: [Valid Duration] RunTime=2.550 sec; SentMessages=195497; ReceivedMessages=195497
sockperf: ---> percentile 99.999 = 1144.529
sockperf: ---> percentile 99.000 =   20.550
sockperf: ---> percentile 50.000 =   13.632
"""

WRK_OUT = """\
Running 2s test @ http://127.0.0.1:1/
  12345 requests in 2.00s, 14.63MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:   6172.50
"""


def test_parse_pingpong() -> None:
    s = parse_pingpong(SOCKPERF_OUT)
    assert s["p50_us"] == pytest.approx(13.632)
    assert s["p99_us"] == pytest.approx(20.55)
    assert s["rate"] == pytest.approx(195497 / 2.55)


def test_parse_pingpong_no_reply() -> None:
    with pytest.raises(RuntimeError, match="no reply"):
        parse_pingpong("sockperf: No messages were received from the server. Is the server down?")


def test_parse_wrk_counts_errors() -> None:
    assert parse_wrk(WRK_OUT) == {"rps": 6172.5, "errors": 6.0}
    with pytest.raises(RuntimeError):
        parse_wrk("garbage")


def test_parse_iperf3() -> None:
    ok = {"end": {"sum_received": {"bits_per_second": 2.5e10}, "sum_sent": {"retransmits": 3}}}
    assert parse_iperf3(json.dumps(ok)) == {"gbps": 25.0, "retransmits": 3.0}
    with pytest.raises(RuntimeError, match="refused"):
        parse_iperf3(json.dumps({"end": {}, "error": "Connection refused"}))


def test_origin_total(tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    log.write_text(
        "  2529395 [usec]   3953 [msg/s]   10000 [msg]\n 1 [usec] 2 [msg/s] 20000 [msg]\n"
    )
    assert origin_total(log) == 20000
    log.write_text("no activity yet\n")
    assert origin_total(log) == 0


def test_summarize_median_and_quartiles() -> None:
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"]) == (3.0, 1.0, 5.0, 2.0, 4.0)


def test_run_rounds_rotates_and_reports_failures() -> None:
    eps: dict[str, Endpoint | str] = {
        "a": Endpoint("a", 1),
        "b": Endpoint("b", 2),
        "c": "could not start",
    }
    order: list[str] = []

    def measure(ep: Endpoint) -> dict[str, float]:
        order.append(ep.name)
        if ep.name == "b":
            raise RuntimeError("boom")
        return {"v": 1.0}

    out = run_rounds("t", eps, 3, measure)
    # round 2 starts at b; b is dropped after its second failure
    assert order == ["a", "b", "b", "a", "a"]
    assert out["a"] == [{"v": 1.0}] * 3
    assert out["b"] == "measurement failed: boom"
    assert out["c"] == "could not start"


def test_added_latency_pairs_rounds() -> None:
    per: dict[str, list[dict[str, float]] | str] = {
        "direct": [{"p50_us": 10.0, "p99_us": 20.0}, {"p50_us": 12.0, "p99_us": 22.0}],
        "nginx": [{"p50_us": 15.0, "p99_us": 30.0}, {"p50_us": 19.0, "p99_us": 30.0}],
    }
    add_added_latency(per)
    assert [s["added_p50_us"] for s in per["nginx"]] == [5.0, 7.0]  # type: ignore[index]


def _fake_run(portunus_gbps: float | None) -> dict[str, object]:
    per: dict[str, list[dict[str, float]] | str] = {
        "direct": [{"gbps": 40.0}],
        "haproxy": [{"gbps": 20.0}],
        "portunus": [{"gbps": portunus_gbps}] if portunus_gbps else "not installed",
    }
    bench = BenchResult("tcp_throughput_1", "T", "m", [Metric("gbps", "Gbit/s", True)], per)
    return {
        "date": "d",
        "seconds": 60.0,
        "machine": {"nproc": 2, "cpu_model": "x", "memory_gib": 1, "kernel": "k",
                    "python": "3", "commit": "c", "tools": {"iperf3": "v"}},
        "settings": {"rounds": 1, "quick": False, "only": None},
        "benchmarks": [bench.as_dict()],
    }  # fmt: skip


def test_report_marks_missing_portunus_na() -> None:
    run = _fake_run(None)
    text = render(run)
    assert "| portunus | n/a — not installed" in text
    rows = {t["target"]: t for t in targets({b["name"]: b for b in run["benchmarks"]})}  # type: ignore[attr-defined]
    assert rows["single-flow TCP throughput ≥ 0.85× direct"]["status"] == "n/a"


def test_targets_pass_and_fail() -> None:
    run = _fake_run(36.0)  # 0.9x direct (pass), 1.8x haproxy (pass)
    benches = {b["name"]: b for b in run["benchmarks"]}  # type: ignore[attr-defined]
    rows = {t["target"]: t["status"] for t in targets(benches)}
    assert rows["single-flow TCP throughput ≥ 0.85× direct"] == "PASS"
    run = _fake_run(30.0)  # 0.75x direct
    benches = {b["name"]: b for b in run["benchmarks"]}  # type: ignore[attr-defined]
    rows = {t["target"]: t["status"] for t in targets(benches)}
    assert rows["single-flow TCP throughput ≥ 0.85× direct"] == "FAIL"


def test_unstartable_portunus_is_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTUNUS_BIN", "/bin/false")
    with services() as started:
        eps = open_forwarders(started, ("direct", "portunus"), 9, tmp_path)
    assert isinstance(eps["direct"], Endpoint)
    assert isinstance(eps["portunus"], str) and "exited with 1" in eps["portunus"]


def test_stop_kills_whole_tree_even_if_sigterm_ignored(tmp_path: Path) -> None:
    script = "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "subprocess.Popen(['sleep', '60']); time.sleep(60)"  # fmt: skip
    svc = start_service("stubborn", [sys.executable, "-c", script], tmp_path,
                        ready=lambda: True)  # fmt: skip
    assert wait_for(lambda: len(svc.processes()) == 2, 5)
    pids = [p.pid for p in svc.processes()]
    svc.stop(grace=0.5)

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    # SIGKILL is delivered asynchronously: allow the kernel a moment to finish exits.
    assert wait_for(lambda: all(gone(p) for p in pids), 5)


def test_start_timeout_raises_with_reason(tmp_path: Path) -> None:
    with pytest.raises(StartError, match="not ready"):
        start_service("never", ["sleep", "30"], tmp_path, ready=lambda: False, timeout=0.3)


def test_is_listening_sees_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not is_listening(port)
        s.listen()
        assert is_listening(port)


def test_usable_cpus_falls_back_to_all() -> None:
    have = os.sched_getaffinity(0)
    assert usable_cpus({10_000}) == have
    assert usable_cpus({min(have)}) == {min(have)}


def test_report_shows_a_failed_benchmark() -> None:
    run = _fake_run(36.0)
    run["benchmarks"].append({"name": "short_conn", "title": "S", "error": "wrk missing"})  # type: ignore[attr-defined]
    text = render(run)
    assert "n/a — wrk missing" in text
    assert "| short-connection rate ≥ 1.0× nginx | – | n/a (no portunus measurement) |" in text
