"""Added latency: request/response round trips over one persistent TCP connection.

sockperf ping-pong (C client, C server) rather than a Python client, so the client's
own cost (~10 us per round trip in Python) does not dilute the difference between
forwarders. One 64-byte message is in flight at a time; sockperf warms up first and
reports round-trip-time percentiles over every observation of the run.

Everything is pinned (see bench.common.pin): unpinned, the scheduler's placement on two
cores made runs bimodal (a direct p50 of 4.5 or 12.5 us from one run to the next).
Two layouts, both stable to a few percent:

- same core: client, forwarder and origin all on CPU 0. The round trip is pure CPU
  work, so the added latency is the forwarder's own cost per request and response.
  This is the headline and the one the target compares.
- cross core: client and origin on CPU 0, the forwarder on CPU 1, so each hop wakes
  the other core (what a real deployment with an idle core sees).
"""

from __future__ import annotations

import os
import re

from bench.common import LOOPBACK, pin, run_client, services, tool
from bench.forwarders import Endpoint, open_forwarders, portunus_shards
from bench.origins import start_sockperf
from bench.results import BenchResult, Metric, Settings
from bench.rounds import Sample, run_rounds

MSG_SIZE = 64
_PCT = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")
_VALID = re.compile(
    r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)"
)


def parse_pingpong(out: str) -> Sample:
    """p50/p99 round-trip time in microseconds and round trips per second."""
    pct = {float(p): float(v) for p, v in _PCT.findall(out)}
    valid = _VALID.search(out)
    if "No messages were received" in out:
        raise RuntimeError("no reply came back through the forwarder")
    if 50.0 not in pct or 99.0 not in pct or valid is None:
        raise RuntimeError(f"unparseable sockperf output: {out[-300:]}")
    runtime, received = float(valid.group(1)), int(valid.group(3))
    if received == 0:
        raise RuntimeError("sockperf received no reply")
    return {"p50_us": pct[50.0], "p99_us": pct[99.0], "rate": received / runtime}


CLIENT_CPUS = {0}
# name -> (title, forwarder CPUs); the client and origin always run on CPU 0.
LAYOUTS = {
    "latency": ("same core (all on CPU 0)", {0}),
    "latency_cross_core": ("cross core: forwarder on CPU 1", {1}),
}


def sockperf_pingpong(
    ep: Endpoint, seconds: int, size: int, udp: bool, cpus: set[int] | None = None
) -> Sample:
    argv = [
        tool("sockperf"), "ping-pong", "-i", LOOPBACK, "-p", str(ep.port),
        "-m", str(size), "-t", str(seconds), "--full-rtt",
    ]  # fmt: skip
    if not udp:
        argv.insert(2, "--tcp")
    return parse_pingpong(run_client(argv, timeout=seconds + 30, cpus=cpus))


def add_added_latency(per: dict[str, list[Sample] | str]) -> None:
    """added_p50_us per round = contender p50 - direct p50 of the same round."""
    direct = per.get("direct")
    if not isinstance(direct, list):
        return
    for samples in per.values():
        if not isinstance(samples, list):
            continue
        for i, sample in enumerate(samples):
            if i < len(direct):
                sample["added_p50_us"] = sample["p50_us"] - direct[i]["p50_us"]
                sample["added_p99_us"] = sample["p99_us"] - direct[i]["p99_us"]


def latency_rounds(settings: Settings) -> int:
    """Pinned runs vary by a few percent, so 3 rounds suffice (1 per layout in --quick)."""
    return 1 if settings.quick else min(settings.rounds, 3)


def run(settings: Settings) -> list[BenchResult]:
    rounds = latency_rounds(settings)
    layouts = {k: v for k, v in LAYOUTS.items() if max(v[1]) < (os.cpu_count() or 1)}
    results: list[BenchResult] = []
    with services() as started:
        origin, port = start_sockperf(settings.log_dir, udp=False)
        started.append(origin)
        pin(origin, CLIENT_CPUS)
        eps = open_forwarders(
            started, settings.forwarders, port, settings.log_dir, shards=portunus_shards()
        )
        for name, (layout, cpus) in layouts.items():
            for ep in eps.values():
                if not isinstance(ep, str) and ep.service is not None:
                    pin(ep.service, cpus)
            per = run_rounds(
                name,
                eps,
                rounds,
                lambda ep: sockperf_pingpong(
                    ep, settings.latency_secs, MSG_SIZE, udp=False, cpus=CLIENT_CPUS
                ),
            )
            add_added_latency(per)
            results.append(result(name, layout, cpus, settings, rounds, per))
    return results


def result(
    name: str,
    layout: str,
    cpus: set[int],
    settings: Settings,
    rounds: int,
    per: dict[str, list[Sample] | str],
) -> BenchResult:
    return BenchResult(
        name=name,
        title=f"Added latency, {layout} (1 connection, {MSG_SIZE}-byte ping-pong)",
        method=(
            f"sockperf ping-pong --tcp -m {MSG_SIZE} -t {settings.latency_secs} --full-rtt "
            "against `sockperf server --tcp`: one persistent connection, one message in "
            "flight, warm-up by sockperf, every round trip of the run observed "
            "(tens of thousands per measurement). Client and origin pinned to CPU 0, "
            f"every forwarder process and thread pinned to CPU {min(cpus)}; {rounds} round(s). "
            "added = contender p50 - direct p50 of the same round."
        ),
        metrics=[
            Metric("added_p50_us", "added p50 µs", False, 1),
            Metric("p50_us", "p50 RTT µs", False, 1),
            Metric("p99_us", "p99 RTT µs", False, 1),
            Metric("added_p99_us", "added p99 µs", False, 1),
            Metric("rate", "round trips/s", True, 0),
        ],
        per_forwarder=per,
    )
