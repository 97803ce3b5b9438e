"""Run settings and the result record every benchmark module returns.

A result is plain JSON-ready data so bench/results/latest.json is just the list of
them; bench/report.py turns the same data into RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.rounds import Sample, summarize_all


@dataclass
class Settings:
    """Knobs for one harness run; --quick shrinks durations, rounds and counts."""

    log_dir: Path
    rounds: int = 5
    # Seconds per iperf3 / wrk measurement: 6 rather than 10 so that 5 rounds of 5
    # contenders fit the 15-minute budget; loopback iperf3 is steady within 0.5 s.
    duration: int = 6
    latency_secs: int = 3  # sockperf ping-pong run (+2 s fixed warm-up of its own)
    udp_secs: int = 3  # per UDP ping-pong and per blast
    idle_conns: int = 10_000
    forwarders: tuple[str, ...] = ("direct", "portunus", "haproxy", "nginx", "socat")
    quick: bool = False


@dataclass
class Metric:
    """One measured quantity; the first metric of a result is its headline."""

    key: str
    label: str
    higher_is_better: bool
    digits: int = 2

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "higher_is_better": self.higher_is_better,
            "digits": self.digits,
        }


@dataclass
class BenchResult:
    name: str
    title: str
    method: str
    metrics: list[Metric]
    per_forwarder: dict[str, list[Sample] | str]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "method": self.method,
            "metrics": [m.as_dict() for m in self.metrics],
            "results": summarize_all(self.per_forwarder),
            "ratios": ratios(self.metrics[0].key, summarize_all(self.per_forwarder)),
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
            **self.extra,
        }


def median_of(results: dict[str, Any], fwd: str, key: str) -> float | None:
    entry = results.get(fwd)
    if not entry or "error" in entry or key not in entry:
        return None
    return float(entry[key]["median"])


def ratios(key: str, results: dict[str, Any], subject: str = "portunus") -> dict[str, float]:
    """portunus/X of the headline metric's medians, for every other contender X."""
    mine = median_of(results, subject, key)
    out: dict[str, float] = {}
    if mine is None:
        return out
    for other in results:
        theirs = median_of(results, other, key)
        if other != subject and theirs:
            out[f"{subject}/{other}"] = mine / theirs
    return out
