"""Checks of the edge-client benchmark: its report rows, and one tiny end-to-end
run of the fake fleet against a real ``portunus-server serve``.

    PYTHONPATH=$PWD .venv/bin/python -m pytest bench/test_edge_clients.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import edge_clients  # noqa: E402
from bench.report import targets  # noqa: E402
from bench.results import BenchResult, Metric  # noqa: E402


def _bench(name: str, values: list[float], clients: int) -> dict[str, Any]:
    from bench.control_plane import Series

    s = Series(name, "ms", values)
    return BenchResult(
        name=name,
        title=name,
        method="m",
        metrics=[Metric("value", "v", False)],
        per_forwarder={"portunus": [{"value": v} for v in values]},
        extra={"summary": s.summary(), "clients": clients},
    ).as_dict()


def test_edge_targets_pass_fail_and_scale() -> None:
    fast = [5.0] * 98 + [40.0, 40.0]  # nearest-rank p99 = 40 ms
    slow = [5.0] * 98 + [150.0, 150.0]  # p99 = 150 ms
    benches = {
        "edge_clients_list_rpc": _bench("edge_clients_list_rpc", fast, 1000),
        "edge_clients_push": _bench("edge_clients_push", slow, 1000),
        "edge_clients_list_http": _bench("edge_clients_list_http", fast, 200),
    }
    rows = {t["target"]: t for t in targets(benches)}
    assert rows["1,000 edge clients: `clients.list` p99 ≤ 100 ms"]["status"] == "PASS"
    assert rows["1,000 edge clients: `clients.list` p99 ≤ 100 ms"]["value"] == "40.0 ms"
    assert rows["1,000 edge clients: push → acked p99 ≤ 100 ms"]["status"] == "FAIL"
    http = rows["1,000 edge clients: `GET /v1/clients` p99 ≤ 100 ms"]
    assert http["status"] == "PASS" and http["why"] == "measured with 200 clients"
    restart = rows["server restart → 100 edge clients reconnected and reconciled ≤ 10 s (median)"]
    assert restart["status"] == "n/a" and restart["why"] == "not run"


def test_fleet_slices_keep_order_and_default_procs_scale() -> None:
    from bench.fleet_group import _slices, default_procs

    items = list(range(10))
    parts = _slices(items, 3)
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [x for p in parts for x in p] == items
    assert _slices([1], 2) == [[1], []]
    assert [default_procs(n, 2) for n in (6, 2500, 2501, 10000)] == [1, 1, 2, 2]
    assert [default_procs(n, 8) for n in (2500, 10000, 100000)] == [1, 4, 8]


@pytest.mark.timeout(180)
def test_tiny_run_end_to_end(tmp_path: Path) -> None:
    """Enroll, connect, list, push and restart with a handful of fakes: every step
    checks what the server says (connected counts, ``active`` acks, re-syncs)."""
    args = edge_clients.parse_args(
        [
            "--clients",
            "6",
            "--lists",
            "5",
            "--pushes",
            "5",
            "--scrapes",
            "3",
            "--restart-clients",
            "4",
            "--rules-each",
            "2",
            "--restarts",
            "1",
            "--idle-secs",
            "1",
            "--fleet-procs",
            "2",
            "--out",
            str(tmp_path / "out.md"),
        ]
    )
    res = edge_clients.measure(args)
    assert res.facts["fleet_procs"] == 2  # each process ran some of the fakes, merged
    cpu = res.facts["restart_cpu"][0]
    storm = res.facts["restart_failures"][0]
    assert storm["attempts_failed"] >= storm["fakes_failed"] >= 0
    assert isinstance(storm["preauth_refused"], dict)
    # Control's CPU counts from its start (never 0); 4 fakes re-syncing may use less than
    # one clock tick of the fleet's.
    assert cpu["control_s"] > 0 and cpu["fleet_s"] >= 0 and cpu["serve_tree_s"] >= cpu["control_s"]
    assert len(res.series["push"].values) == 5
    assert len(res.series["restart"].values) == 1
    assert res.facts["mem_connected"]["control_fds"] >= res.facts["mem_empty"]["control_fds"] + 6
    assert res.facts["reconnects_during_run"] == 0
    text = edge_clients.render(res, args)
    assert "restart → 4 × 2 rules reconnected + reconciled" in text
    assert "CPU from spawn to the last re-sync" in text and "--fleet-procs 2" in text
    assert "Failed connect attempts in the storm" in text
    assert res.facts["server_tracebacks"] == 0
    assert len(res.series["get_rpc"].values) == 5
    # The operator's views with the fleet up: every fake is a row of the UI page, and
    # the connected gauge is one series whatever the fleet.
    assert len(res.series["ui_clients"].values) == 5
    assert res.facts["ui_client_rows"] == 6 + 1  # the fakes and the server's own "local"
    assert len(res.series["scrape"].values) == 3
    assert res.facts["scrape_connected_series"] == 1
    assert "`GET /metrics` scrape p99, 6 connected" in text
