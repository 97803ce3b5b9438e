"""Added latency: request/response round trips over one persistent TCP connection.

sockperf ping-pong (C client, C server) rather than a Python client, so the client's
own cost (~10 us per round trip in Python) does not dilute the difference between
forwarders. One 64-byte message is in flight at a time; sockperf warms up first and
reports round-trip-time percentiles over every observation of the run.
"""

from __future__ import annotations

import re

from bench.common import LOOPBACK, run_client, services, tool
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


def sockperf_pingpong(ep: Endpoint, seconds: int, size: int, udp: bool) -> Sample:
    argv = [
        tool("sockperf"), "ping-pong", "-i", LOOPBACK, "-p", str(ep.port),
        "-m", str(size), "-t", str(seconds), "--full-rtt",
    ]  # fmt: skip
    if not udp:
        argv.insert(2, "--tcp")
    return parse_pingpong(run_client(argv, timeout=seconds + 30))


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


def run(settings: Settings) -> BenchResult:
    with services() as started:
        origin, port = start_sockperf(settings.log_dir, udp=False)
        started.append(origin)
        eps = open_forwarders(
            started, settings.forwarders, port, settings.log_dir, shards=portunus_shards()
        )
        per = run_rounds(
            "latency",
            eps,
            settings.rounds,
            lambda ep: sockperf_pingpong(ep, settings.latency_secs, MSG_SIZE, udp=False),
        )
    add_added_latency(per)
    return BenchResult(
        name="latency",
        title="Added latency (1 connection, 64-byte ping-pong)",
        method=(
            f"sockperf ping-pong --tcp -m {MSG_SIZE} -t {settings.latency_secs} --full-rtt "
            "against `sockperf server --tcp`: one persistent connection, one message in "
            "flight, warm-up by sockperf, every round trip of the run observed "
            "(tens of thousands per measurement). added = contender p50 - direct p50 of "
            "the same round."
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
