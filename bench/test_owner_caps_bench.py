"""The owner-cap benchmark's arithmetic and its target line (bench/owner_caps.py)."""

from __future__ import annotations

from bench.owner_caps import results, steady_rate
from bench.report import targets


def test_steady_rate_skips_the_burst() -> None:
    # 64 KiB at once (the burst), then 1,000 B every 10 ms for 3 s: 100 kB/s.
    points = [(0.0, 65536)] + [(0.01 * i, 1000) for i in range(1, 301)]
    assert abs(steady_rate(points, skip=1.0) - 100_000) < 1
    assert steady_rate([], skip=1.0) == 0.0
    assert steady_rate([(0.0, 5)], skip=1.0) == 0.0


def test_target_passes_within_two_percent_only() -> None:
    def arm(err: float) -> list[dict[str, float]]:
        return [{"ratio": 1 + err / 100, "error_pct": err, "mbit": 1.0}]

    benches = {
        r.name: r.as_dict()
        for r in results(
            {
                1: {"portunus": arm(0.5), "portunus-rule": arm(-0.2)},
                10: {"portunus": arm(-2.5), "portunus-rule": arm(0.1)},
            },
            6.0,
        )
    }
    got = {t["target"]: t for t in targets(benches) if t["target"].startswith("owner cap")}
    one = got["owner cap at 1 Mbit/s: 2 rules on 2 shards within ±2 % of the cap"]
    assert one["status"] == "PASS" and one["value"] == "+0.50 % (rule cap: -0.20 %)"
    assert (
        got["owner cap at 10 Mbit/s: 2 rules on 2 shards within ±2 % of the cap"]["status"]
        == "FAIL"
    )
    assert (
        got["owner cap at 100 Mbit/s: 2 rules on 2 shards within ±2 % of the cap"]["status"]
        == "n/a"
    )
