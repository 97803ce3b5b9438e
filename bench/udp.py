"""UDP forwarding: 512-byte datagram rate, ping-pong and one-way blast.

Origin: one ``sockperf server`` (UDP) that answers ping-pong requests and, with
``-A 10000``, logs its running total of received messages every 10,000 datagrams;
the delivered count of a blast is the difference of that total around the run.

- ping-pong: ``sockperf ping-pong -m 512`` — one datagram in flight, so the rate is
  the per-datagram cost of a round trip through the forwarder (no loss possible).
  Everything pinned to CPU 0, as in the same-core TCP latency benchmark.
- blast: ``sockperf throughput -m 512`` sends as fast as it can for the whole run;
  delivered/s is what reached the origin. The sender is pinned to CPU 0 (which it
  saturates), forwarder and origin to CPU 1, the same for every contender.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    LOOPBACK,
    Service,
    free_port,
    is_listening,
    pin,
    run_client,
    services,
    start_service,
    tool,
    wait_for,
)
from bench.cpu_per_conn import cpu_seconds
from bench.forwarders import Endpoint, open_forwarders, portunus_shards
from bench.latency import CLIENT_CPUS, sockperf_pingpong
from bench.results import BenchResult, Metric, Settings
from bench.rounds import Sample, run_rounds

DATAGRAM = 512
ACTIVITY = 1_000  # the origin logs its total every ACTIVITY datagrams: the resolution of a blast
# Blast layout: the sender saturates CPU 0; forwarder and origin share CPU 1.
SENDER_CPUS, RECEIVER_CPUS = {0}, {1}
_TOTAL = re.compile(r"(\d+) \[msg\]\s*$", re.M)
_SENT = re.compile(r"Total of (\d+) messages sent in ([\d.]+) sec")


def origin_total(log_path: Path) -> int:
    """The origin's running total of received datagrams (multiple of ACTIVITY)."""
    totals = _TOTAL.findall(log_path.read_text(errors="replace"))
    return int(totals[-1]) if totals else 0


def settled_total(log_path: Path) -> int:
    """The total once datagrams still in flight have been counted (log stops moving)."""
    last = origin_total(log_path)

    def unchanged() -> bool:
        nonlocal last
        time.sleep(0.3)
        now = origin_total(log_path)
        same, last = now == last, now
        return same

    wait_for(unchanged, 5, 0)
    return last


def blast_sample(ep: Endpoint, seconds: int, origin_log: Path) -> Sample:
    before = settled_total(origin_log)
    argv = [
        tool("sockperf"), "throughput", "-i", LOOPBACK, "-p", str(ep.port),
        "-m", str(DATAGRAM), "-t", str(seconds),
    ]  # fmt: skip
    out = run_client(argv, timeout=seconds + 15, cpus=SENDER_CPUS)
    sent = _SENT.search(out)
    if sent is None:
        raise RuntimeError(f"unparseable sockperf output: {out[-300:]}")
    delivered = settled_total(origin_log) - before
    n_sent, runtime = int(sent.group(1)), float(sent.group(2))
    if delivered <= 0:
        raise RuntimeError(f"no datagram reached the origin ({n_sent} sent)")
    return {
        "delivered_pps": delivered / runtime,
        "sent_pps": n_sent / runtime,
        "loss_pct": max(0.0, 100.0 * (1 - delivered / n_sent)),
    }


def with_cpu(
    ep: Endpoint, measure: Callable[[], Sample], count: Callable[[Sample], float]
) -> Sample:
    """``measure()`` plus ``cpu_us``: the forwarder's whole process tree's utime+stime
    over the run ÷ ``count(sample)`` (round trips, delivered datagrams).  Steadier than
    a rate on a shared machine: scheduling delays cost time, not the forwarder's CPU."""
    if ep.service is None:
        return measure()
    u0, s0 = cpu_seconds(ep.service)
    sample = measure()
    u1, s1 = cpu_seconds(ep.service)
    n = count(sample)
    if n > 0:
        sample["cpu_us"] = ((u1 - u0) + (s1 - s0)) * 1e6 / n
    return sample


def pin_all(origin: Service, eps: dict[str, Endpoint | str], cpus: set[int]) -> None:
    pin(origin, cpus)
    for ep in eps.values():
        if not isinstance(ep, str) and ep.service is not None:
            pin(ep.service, cpus)


def run(settings: Settings) -> list[BenchResult]:
    names = settings.forwarders  # haproxy shows as n/a: it does not forward UDP
    secs = settings.udp_secs
    rounds = 1 if settings.quick else settings.rounds  # keeps --quick under 3 minutes
    # Every round, not latency's 3: a UDP round trip is a few µs of forwarder work
    # beside tens of µs of scheduling, so the rate needs as many paired rounds as the blast.
    pp_rounds = rounds
    with services() as started:
        port = free_port()
        argv = [tool("sockperf"), "server", "-i", LOOPBACK, "-p", str(port), "-A", str(ACTIVITY)]
        origin = start_service(
            f"sockperf-udp-{port}", argv, settings.log_dir, ready=lambda: is_listening(port, True)
        )
        started.append(origin)
        eps = open_forwarders(
            started, names, port, settings.log_dir, udp=True, shards=portunus_shards()
        )
        pin_all(origin, eps, CLIENT_CPUS)
        pingpong = run_rounds(
            "udp_pingpong",
            eps,
            pp_rounds,
            lambda ep: with_cpu(
                ep,
                lambda: sockperf_pingpong(ep, secs, DATAGRAM, udp=True, cpus=CLIENT_CPUS),
                lambda s: s["rate"] * secs,
            ),
        )
        pin_all(origin, eps, RECEIVER_CPUS)
        blast = run_rounds(
            "udp_blast",
            eps,
            rounds,
            lambda ep: with_cpu(
                ep,
                lambda: blast_sample(ep, secs, origin.log_path),
                lambda s: s["delivered_pps"] * secs,
            ),
        )
    return [
        BenchResult(
            name="udp_pingpong",
            title=f"UDP ping-pong ({DATAGRAM}-byte datagrams, one in flight)",
            method=(
                f"sockperf ping-pong -m {DATAGRAM} -t {secs} --full-rtt (UDP) against "
                f"`sockperf server`; value = round trips/s over sockperf's valid duration; "
                f"client, forwarder and origin pinned to CPU 0; {pp_rounds} round(s). "
                f"CPU = utime+stime of the forwarder's processes over the run ÷ round trips "
                f"(≈ rate × duration)."
            ),
            metrics=[
                Metric("rate", "round trips/s", True, 0),
                Metric("p50_us", "p50 RTT µs", False, 1),
                Metric("p99_us", "p99 RTT µs", False, 1),
                Metric("cpu_us", "forwarder CPU µs per round trip", False, 2),
            ],
            per_forwarder=pingpong,
        ),
        BenchResult(
            name="udp_blast",
            title=f"UDP one-way blast ({DATAGRAM}-byte datagrams)",
            method=(
                f"sockperf throughput -m {DATAGRAM} -t {secs} (sends at maximum rate); "
                f"delivered = datagrams counted by the origin (`sockperf server -A {ACTIVITY}`, "
                f"resolution {ACTIVITY:,}) / run time; loss = 1 - delivered/sent; "
                f"sender pinned to CPU 0, forwarder and origin to CPU 1; {rounds} round(s). "
                f"CPU = the forwarder's utime+stime ÷ delivered datagrams."
            ),
            metrics=[
                Metric("delivered_pps", "delivered datagrams/s", True, 0),
                Metric("sent_pps", "sent datagrams/s", True, 0),
                Metric("loss_pct", "loss %", False, 1),
                Metric("cpu_us", "forwarder CPU µs per delivered datagram", False, 2),
            ],
            per_forwarder=blast,
        ),
    ]
