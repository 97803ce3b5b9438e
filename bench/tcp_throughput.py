"""TCP bulk throughput through each contender with iperf3 (1 flow and 4 flows)."""

from __future__ import annotations

import json

from bench.common import LOOPBACK, run_client, services, tool
from bench.forwarders import Endpoint, open_forwarders, portunus_shards
from bench.origins import start_iperf3
from bench.results import BenchResult, Metric, Settings
from bench.rounds import Sample, run_rounds


def parse_iperf3(out: str) -> Sample:
    """The receiver-side rate is what actually crossed the forwarder."""
    data = json.loads(out)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    sample = {"gbps": end["sum_received"]["bits_per_second"] / 1e9}
    retrans = end.get("sum_sent", {}).get("retransmits")
    if retrans is not None:
        sample["retransmits"] = float(retrans)
    return sample


def iperf3_sample(ep: Endpoint, seconds: int, flows: int) -> Sample:
    argv = [tool("iperf3"), "-c", LOOPBACK, "-p", str(ep.port), "-t", str(seconds), "-J"]
    if flows > 1:
        argv += ["-P", str(flows)]
    # iperf3 -J exits 1 with {"error": ...} on stdout; parse_iperf3 raises with it.
    return parse_iperf3(run_client(argv, timeout=seconds + 30, ok_codes=(0, 1)))


def run(settings: Settings, flows: int) -> BenchResult:
    name = "tcp_throughput_1" if flows == 1 else f"tcp_throughput_{flows}"
    with services() as started:
        origin, port = start_iperf3(settings.log_dir)
        started.append(origin)
        eps = open_forwarders(
            started, settings.forwarders, port, settings.log_dir, shards=portunus_shards()
        )
        per = run_rounds(
            name, eps, settings.rounds, lambda ep: iperf3_sample(ep, settings.duration, flows)
        )
    flow_text = "one flow" if flows == 1 else f"{flows} parallel flows (-P {flows})"
    return BenchResult(
        name=name,
        title=f"TCP throughput, {flow_text}",
        method=(
            f"iperf3 -c {LOOPBACK} -p PORT -t {settings.duration} -J"
            f"{'' if flows == 1 else f' -P {flows}'} against `iperf3 -s` on loopback; "
            "value = end.sum_received.bits_per_second (receiver side)."
        ),
        metrics=[Metric("gbps", "Gbit/s", True), Metric("retransmits", "retransmits", False, 0)],
        per_forwarder=per,
    )


def run_single(settings: Settings) -> BenchResult:
    return run(settings, 1)


def run_parallel(settings: Settings) -> BenchResult:
    return run(settings, 4)
