"""Short-connection rate: one HTTP request per TCP connection, through each contender.

This is the accept/connect/teardown cost of a forwarder, which bulk throughput hides.
"""

from __future__ import annotations

import re

from bench.common import LOOPBACK, run_client, services, tool
from bench.forwarders import Endpoint, open_forwarders, portunus_shards
from bench.origins import BODY_SIZE, start_nginx_http
from bench.results import BenchResult, Metric, Settings
from bench.rounds import Sample, run_rounds

THREADS, CONNECTIONS = 2, 64
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_TOTAL = re.compile(r"(\d+) requests in")


def parse_wrk(out: str) -> Sample:
    rps, total = _RPS.search(out), _TOTAL.search(out)
    if rps is None or total is None:
        raise RuntimeError(f"unparseable wrk output: {out[-300:]}")
    if int(total.group(1)) == 0:
        raise RuntimeError(f"wrk completed no request: {out[-300:]}")
    errors = sum(int(g) for g in m.groups()) if (m := _ERRORS.search(out)) else 0
    non2xx = int(m.group(1)) if (m := _NON2XX.search(out)) else 0
    return {"rps": float(rps.group(1)), "errors": float(errors + non2xx)}


def wrk_sample(ep: Endpoint, seconds: int) -> Sample:
    argv = [
        tool("wrk"), f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s",
        "-H", "Connection: close", f"http://{LOOPBACK}:{ep.port}/",
    ]  # fmt: skip
    return parse_wrk(run_client(argv, timeout=seconds + 30))


def run(settings: Settings) -> BenchResult:
    with services() as started:
        origin, port = start_nginx_http(settings.log_dir, workers=1)
        started.append(origin)
        eps = open_forwarders(
            started, settings.forwarders, port, settings.log_dir, shards=portunus_shards()
        )
        per = run_rounds(
            "short_conn", eps, settings.rounds, lambda ep: wrk_sample(ep, settings.duration)
        )
    return BenchResult(
        name="short_conn",
        title="Short-connection rate (one HTTP request per connection)",
        method=(
            f"wrk -t{THREADS} -c{CONNECTIONS} -d{settings.duration}s "
            "-H 'Connection: close' against an nginx HTTP origin (1 worker, access_log off) "
            f"answering a {BODY_SIZE}-byte body from memory; value = wrk Requests/sec. "
            "`errors` = wrk socket errors + non-2xx responses."
        ),
        metrics=[Metric("rps", "requests/s", True, 0), Metric("errors", "errors", False, 0)],
        per_forwarder=per,
    )
