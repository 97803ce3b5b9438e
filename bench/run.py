"""Run the benchmark suite: ``python -m bench.run [--quick] [--only NAME ...]``.

A full run writes bench/RESULTS.md and its raw data bench/results/latest.json;
--quick / --only runs write bench/results/partial.md and partial.json instead, so a
quick check never overwrites the committed full results (--out / --json override).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from bench import (
    control_plane,
    failover,
    idle_memory,
    latency,
    owner_caps,
    range_push,
    short_conn,
    sni,
    tcp_throughput,
    udp,
)
from bench.common import REPO, machine_info, raise_nofile, stop_all
from bench.forwarders import EXTRA, FORWARDERS, portunus_bin, portunus_shards
from bench.report import render, targets
from bench.results import BenchResult, Settings
from bench.rounds import log

HERE = Path(__file__).resolve().parent


def _edge_clients(settings: Settings) -> list[BenchResult]:
    """Imported on use: it pulls in the e2e fixtures (tests/e2e/support.py)."""
    from bench import edge_clients

    return edge_clients.run(settings)


def _preauth_flood(settings: Settings) -> BenchResult:
    """Imported on use, like edge_clients: it starts servers with the e2e fixtures."""
    from bench import preauth_flood

    return preauth_flood.run(settings)


BENCHMARKS: dict[str, Callable[[Settings], BenchResult | list[BenchResult]]] = {
    "tcp_throughput_1": tcp_throughput.run_single,
    "tcp_throughput_4": tcp_throughput.run_parallel,
    "short_conn": short_conn.run,
    "latency": latency.run,
    "idle_memory": idle_memory.run,
    "udp": udp.run,
    "range_push": range_push.run,
    "control_plane": control_plane.run,
    "edge_clients": _edge_clients,
    "sni": sni.run,
    "failover": failover.run,
    "preauth_flood": _preauth_flood,
    "owner_caps": owner_caps.run,
}
# range_push needs blocks of 1,024 consecutive unused ports below 32768: it runs first,
# before the other benchmarks leave tens of thousands of TIME_WAIT sockets on random
# listen ports there.  The report keeps the BENCHMARKS order.
RUN_FIRST = ("range_push",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 rounds of short runs (< 3 min)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only these: {', '.join(BENCHMARKS)}",
    )
    p.add_argument("--rounds", type=int, help="rounds per benchmark (default 5, quick 2)")
    p.add_argument("--duration", type=int, help="seconds per iperf3/wrk run (default 6, quick 2)")
    p.add_argument("--idle-conns", type=int, help="idle connections (default 10000)")
    p.add_argument(
        "--forwarders",
        nargs="+",
        choices=FORWARDERS + EXTRA,
        default=list(FORWARDERS),
        help="portunus-py: the same Portunus with PORTUNUS_NATIVE=0 (both data paths in one run); "
        "portunus-loop: PORTUNUS_NATIVE_THREAD=0 (the native relay driven from the shard's loop)",
    )
    p.add_argument("--out", type=Path, help="Markdown report path")
    p.add_argument("--json", type=Path, help="raw JSON path (default results/latest.json)")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir of logs")
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace, log_dir: Path) -> Settings:
    s = Settings(log_dir=log_dir, forwarders=tuple(args.forwarders), quick=args.quick)
    if args.quick:
        s.rounds, s.duration, s.latency_secs, s.udp_secs = 2, 1, 1, 1
    if args.rounds:
        s.rounds = args.rounds
    if args.duration:
        s.duration = args.duration
    if args.idle_conns:
        s.idle_conns = args.idle_conns
    return s


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every services() scope


def _repo_relative(path: str | None) -> str | None:
    """A binary inside the checkout as a repo-relative path: results name no machine's paths."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    raise_nofile()  # the idle-memory benchmark holds 10k client sockets in this process
    log_dir = Path(tempfile.mkdtemp(prefix="portunus-bench-"))
    settings = make_settings(args, log_dir)
    names = args.only or list(BENCHMARKS)
    started = time.monotonic()
    run: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "portunus_bin": _repo_relative(portunus_bin()),
        "portunus_shards": portunus_shards(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "rounds": settings.rounds,
            "duration": settings.duration,
            "latency_secs": settings.latency_secs,
            "udp_secs": settings.udp_secs,
            "idle_conns": settings.idle_conns,
            "forwarders": list(settings.forwarders),
            "quick": settings.quick,
            "only": args.only,
        },
    }
    per_name: dict[str, list[dict[str, object]]] = {name: [] for name in names}
    try:
        for name in sorted(names, key=lambda n: n not in RUN_FIRST):
            benches = per_name[name]
            log(f"== {name}")
            t0 = time.monotonic()
            try:
                out = BENCHMARKS[name](settings)
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not lose the run
                log(f"{name}: FAILED {exc!r}")
                traceback.print_exc()
                benches.append(
                    {"name": name, "title": name, "error": f"{type(exc).__name__}: {exc}"}
                )
                continue
            results = out if isinstance(out, list) else [out]
            for res in results:
                res.seconds = (time.monotonic() - t0) / len(results)
                benches.append(res.as_dict())
    except KeyboardInterrupt:
        log("interrupted; processes stopped, no report written")
        return 130
    finally:
        stop_all()
        if args.keep_logs:
            log(f"logs kept in {log_dir}")
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    run["benchmarks"] = [b for name in names for b in per_name[name]]
    run["seconds"] = time.monotonic() - started
    run["load_end"] = [round(x, 2) for x in os.getloadavg()]
    run["targets"] = targets({b["name"]: b for b in benches})  # type: ignore[misc]
    partial = bool(args.quick or args.only)
    out_json = args.json or HERE / "results" / ("partial.json" if partial else "latest.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(run, indent=2) + "\n")
    out_md = args.out or (HERE / "results" / "partial.md" if partial else HERE / "RESULTS.md")
    out_md.write_text(render(run))
    log(f"wrote {out_md} and {out_json} in {run['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
