"""Control-plane benchmarks for ``portunus-server serve`` (issue 4 targets).

    python -m bench.control_plane [--rpc-pushes 500] [--cli-pushes 100] [--stored 1000]
                                  [--starts 5] [--lists 300] [--shards N] [--quick]
                                  [--out bench/results/control_plane.md] [--json F]

Starts its own servers (temp data dirs, loopback ports, default log level) with the
e2e fixture ``tests.e2e.support.ServerProc`` and measures:

1. **push → active over RPC**: ``--rpc-pushes`` sequential ``rules.push`` calls on
   the control socket (``portunus.control.rpc.caller.call_sync``, one connection per
   call, as the CLI does), each a fresh port to one echo origin.  The reply comes
   once the data plane confirmed the rule ``active``; right after each reply a
   connect to the port must succeed (counted, never retried).  5 unmeasured warm-ups.
2. **push → active via the CLI**: ``--cli-pushes`` runs of ``portunus-server
   push-rule local PORT HOST:PORT`` (wall clock of the whole process, interpreter
   start included); ``portunus-server --version`` is timed too, as the floor.
3. **start → READY with stored rules**: ``--stored`` single-port rules are pushed,
   then ``serve`` is stopped and started ``--starts`` times with a fake
   ``$NOTIFY_SOCKET``: spawn → READY=1, spawn → /v1/health 200, spawn → every stored
   port in LISTEN.  The same with no rules gives the baseline.
4. **GET /v1/rules with the stored rules**: ``--lists`` sequential requests on one
   keep-alive connection, then a third as many with a new connection each.

Targets: push → active p50 ≤ 20 ms and p99 ≤ 100 ms (RPC); READY ≤ 3 s with 1,000
rules; list p99 ≤ 50 ms.  Exit status 1 when a target is missed.

For ``bench.run``: ``run(settings) -> list[BenchResult]`` (see the module end).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.results import BenchResult, Metric, Settings  # noqa: E402
from portunus.control.rpc.caller import call_sync  # noqa: E402
from tests.e2e.support import (  # noqa: E402
    LOOPBACK,
    SERVER_BIN,
    FakeNotify,
    Origin,
    PortAllocator,
    ServerProc,
    echo,
    listening_ports,
)

HERE = Path(__file__).resolve().parent
TARGETS = {
    "rpc_p50_ms": 20.0,
    "rpc_p99_ms": 100.0,
    "ready_s": 3.0,
    "list_p99_ms": 50.0,
}


# ------------------------------------------------------------------ stats


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was actually observed."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Series:
    """One measured distribution (milliseconds or seconds, see ``unit``)."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""

    def summary(self) -> dict[str, Any]:
        v = self.values
        if not v:
            return {"name": self.name, "unit": self.unit, "n": 0}
        return {
            "name": self.name,
            "unit": self.unit,
            "n": len(v),
            "min": min(v),
            "p50": pct(v, 50),
            "p90": pct(v, 90),
            "p99": pct(v, 99),
            "max": max(v),
            "note": self.note,
        }


def log(msg: str) -> None:
    print(f"[control_plane] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ server


@contextmanager
def running_server(
    workdir: Path, ports: PortAllocator, shards: int | None, settings: dict[str, Any] | None = None
) -> Iterator[ServerProc]:
    srv = ServerProc(
        workdir=workdir,
        data_dir=workdir / "data",
        ports=ports,
        shards=shards or (os.cpu_count() or 1),
        name="server",
        settings={"shutdown_drain_timeout_secs": 1, **(settings or {})},
    )
    try:
        srv.start()
        srv.wait_ready(timeout=60)
        yield srv
    finally:
        srv.cleanup()


def push_params(port: int, target_port: int) -> dict[str, Any]:
    return {
        "client": "local",
        "listen_port": port,
        "targets": [{"host": LOOPBACK, "port": target_port}],
    }


def accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((LOOPBACK, port)) == 0


# ------------------------------------------------------------------ 1. RPC pushes


def bench_rpc_push(
    srv: ServerProc, ports: PortAllocator, origin: Origin, n: int
) -> tuple[Series, int]:
    """``n`` timed ``rules.push`` round trips; returns the series and how many
    ports did not accept a connect right after their reply."""
    token = srv.token
    for _ in range(5):  # warm-up: imports, SQLite pages, first binds
        call_sync(
            srv.socket_path, token, "rules.push", push_params(ports.port(), origin.port), 10.0
        )
    series = Series("push → active, control socket RPC", "ms")
    not_accepting = 0
    for i in range(n):
        port = ports.port()
        t0 = time.perf_counter()
        rule = call_sync(srv.socket_path, token, "rules.push", push_params(port, origin.port), 10.0)
        series.values.append((time.perf_counter() - t0) * 1000)
        if rule.get("state") != "active":
            raise RuntimeError(f"push {i} answered {rule.get('state')}: {rule}")
        if not accepts(port):
            not_accepting += 1
    return series, not_accepting


# ------------------------------------------------------------------ 2. CLI pushes


def bench_cli_push(
    srv: ServerProc, ports: PortAllocator, origin: Origin, n: int
) -> tuple[Series, Series]:
    env = srv.cli_env(srv.token)
    floor = Series("`portunus-server --version` (interpreter + click start)", "ms")
    for _ in range(max(5, n // 10)):
        t0 = time.perf_counter()
        subprocess.run([SERVER_BIN, "--version"], env=env, capture_output=True, check=True)
        floor.values.append((time.perf_counter() - t0) * 1000)
    series = Series("push → active, `portunus-server push-rule` process", "ms")
    for i in range(n + 3):
        port = ports.port()
        argv = [
            SERVER_BIN,
            "--data-dir",
            str(srv.data_dir),
            "push-rule",
            "local",
            str(port),
            origin.address,
        ]
        t0 = time.perf_counter()
        res = subprocess.run(argv, env=env, capture_output=True, text=True)
        took = (time.perf_counter() - t0) * 1000
        if res.returncode != 0 or " active: " not in res.stdout:
            raise RuntimeError(
                f"CLI push {i} failed ({res.returncode}): {res.stderr or res.stdout}"
            )
        if i >= 3:  # 3 warm-ups (page cache)
            series.values.append(took)
    return series, floor


# ------------------------------------------------------------------ 3. start → READY


@dataclass
class StartTimes:
    ready: Series
    health: Series
    bound: Series
    missing_at_ready: list[int] = field(default_factory=list)


def _spin(cond: Callable[[], bool], srv: ServerProc, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if not srv.alive():
            raise RuntimeError(f"serve exited while waiting for {what}\n{srv.stderr_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {timeout}s\n{srv.stderr_tail()}")
        time.sleep(0.001)


def bench_start(srv: ServerProc, ports_bound: list[int], starts: int, label: str) -> StartTimes:
    """Stop/start ``serve`` ``starts`` times; time spawn → READY=1 / health / all bound."""
    out = StartTimes(
        Series(f"spawn → READY=1 ({label})", "s"),
        Series(f"spawn → /v1/health 200 ({label})", "s"),
        Series(f"spawn → every stored port in LISTEN ({label})", "s"),
    )
    want = set(ports_bound)
    for _ in range(starts):
        if srv.alive():
            rc = srv.stop(signal.SIGTERM, timeout=60)
            if rc != 0:
                raise RuntimeError(f"serve exited {rc} on SIGTERM\n{srv.stderr_tail()}")
        notify = FakeNotify()
        try:
            srv.env["NOTIFY_SOCKET"] = notify.path
            t0 = time.perf_counter()
            srv.start()
            _spin(lambda n=notify: n.count("READY") > 0, srv, "READY=1")  # type: ignore[misc]
            out.ready.values.append(time.perf_counter() - t0)
            out.missing_at_ready.append(len(want - listening_ports()))
            _spin(srv.health_ok, srv, "/v1/health 200")
            out.health.values.append(time.perf_counter() - t0)
            _spin(lambda: want <= listening_ports(), srv, "every stored port in LISTEN")
            out.bound.values.append(time.perf_counter() - t0)
        finally:
            srv.env.pop("NOTIFY_SOCKET", None)
            notify.close()
        srv.wait_ready(timeout=60)
    return out


# ------------------------------------------------------------------ 4. GET /v1/rules

LIST_PATH = "/v1/rules?limit=1000"  # one page, the largest (rules.list pages by cursor)


def bench_list(srv: ServerProc, n: int, expect: int) -> tuple[Series, Series, int]:
    headers = {"Authorization": f"Bearer {srv.token}"}
    keep = Series(f"GET /v1/rules ({expect} rules), keep-alive connection", "ms")
    conn = http.client.HTTPConnection(LOOPBACK, srv.api_port, timeout=30)
    size = 0
    try:
        for i in range(n + 5):
            t0 = time.perf_counter()
            conn.request("GET", LIST_PATH, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            took = (time.perf_counter() - t0) * 1000
            if resp.status != 200:
                raise RuntimeError(f"GET /v1/rules answered {resp.status}: {body[:300]!r}")
            if i == 0:
                listed = json.loads(body)
                got = len(listed["rules"])
                if got != min(expect, 1000) or listed["total"] != expect:
                    raise RuntimeError(f"GET /v1/rules listed {got} rules, expected {expect}")
                size = len(body)
            if i >= 5:
                keep.values.append(took)
    finally:
        conn.close()
    fresh = Series(f"GET /v1/rules ({expect} rules), new connection each", "ms")
    for _ in range(max(10, n // 3)):
        t0 = time.perf_counter()
        c = http.client.HTTPConnection(LOOPBACK, srv.api_port, timeout=30)
        try:
            c.request("GET", LIST_PATH, headers=headers)
            r = c.getresponse()
            r.read()
        finally:
            c.close()
        fresh.values.append((time.perf_counter() - t0) * 1000)
    return keep, fresh, size


# ------------------------------------------------------------------ driver


@dataclass
class Results:
    date: str
    machine: dict[str, Any]
    shards: int
    series: dict[str, Series] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def verdicts(self) -> list[tuple[str, str, float, float, bool]]:
        """(what, shown as, measured, target, pass) for each issue-4 target."""
        rpc = self.series["rpc"].values
        out = [
            ("push → active p50 (RPC)", "ms", pct(rpc, 50), TARGETS["rpc_p50_ms"]),
            ("push → active p99 (RPC)", "ms", pct(rpc, 99), TARGETS["rpc_p99_ms"]),
            (
                f"serve start → READY, {self.facts['stored']} rules (p50 of {len(self.series['ready'].values)})",
                "s",
                pct(self.series["ready"].values, 50),
                TARGETS["ready_s"],
            ),
            (
                f"serve start → READY, {self.facts['stored']} rules (worst)",
                "s",
                max(self.series["ready"].values),
                TARGETS["ready_s"],
            ),
            (
                f"GET /v1/rules p99, {self.facts['stored']} rules (keep-alive)",
                "ms",
                pct(self.series["list"].values, 99),
                TARGETS["list_p99_ms"],
            ),
        ]
        return [(w, u, v, t, v <= t) for w, u, v, t in out]


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def measure(args: argparse.Namespace) -> Results:
    shards = args.shards or (os.cpu_count() or 1)
    res = Results(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), machine(), shards)
    ports = PortAllocator()
    origin = Origin(echo)
    tmp = Path(tempfile.mkdtemp(prefix="portunus-cp-bench-"))
    try:
        # 1 + 2: pushes on one server (rules accumulate: the last push sees ~600 rules).
        with running_server(tmp / "push", ports, shards) as srv:
            log(f"{args.rpc_pushes} pushes over the control socket")
            res.series["rpc"], res.facts["rpc_not_accepting"] = bench_rpc_push(
                srv, ports, origin, args.rpc_pushes
            )
            log(f"{args.cli_pushes} pushes via the CLI")
            res.series["cli"], res.series["cli_floor"] = bench_cli_push(
                srv, ports, origin, args.cli_pushes
            )
        # 3 + 4: start with no rules (baseline), then with --stored rules.
        with running_server(tmp / "stored", ports, shards) as srv:
            log(f"start → READY with no rules, {args.starts} starts")
            empty = bench_start(srv, [], args.starts, "no rules")
            res.series["ready_empty"] = empty.ready
            log(f"storing {args.stored} rules")
            stored_ports = []
            token = srv.token
            for _ in range(args.stored):
                p = ports.port()
                call_sync(srv.socket_path, token, "rules.push", push_params(p, origin.port), 10.0)
                stored_ports.append(p)
            res.facts["stored"] = args.stored
            log(f"start → READY with {args.stored} rules, {args.starts} starts")
            full = bench_start(srv, stored_ports, args.starts, f"{args.stored} rules")
            res.series["ready"], res.series["health"], res.series["bound"] = (
                full.ready,
                full.health,
                full.bound,
            )
            gaps = [
                (h - r) * 1000 for r, h in zip(full.ready.values, full.health.values, strict=True)
            ]
            res.facts["ready_before_health_ms"] = round(max(gaps), 1)
            res.facts["ports_missing_at_ready"] = max(full.missing_at_ready)
            states = {r["state"] for r in srv.rules().values()}
            res.facts["states_after_start"] = sorted(states)
            log(f"{args.lists} x GET /v1/rules with {args.stored} rules")
            res.series["list"], res.series["list_fresh"], res.facts["list_bytes"] = bench_list(
                srv, args.lists, args.stored
            )
    finally:
        origin.close()
        ports.close()
        shutil.rmtree(tmp, ignore_errors=True)
    res.machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


# ------------------------------------------------------------------ report


def _fmt(v: float, unit: str) -> str:
    return f"{v:.2f} s" if unit == "s" else f"{v:.1f} ms"


def render(res: Results, args: argparse.Namespace) -> str:
    m = res.machine
    lines = [
        "## Control plane (issue 4): push latency, start → READY, list",
        "",
        f"Run {res.date} on {m['cpus']} CPU, Python {m['python']}, Linux {m['kernel']}; "
        f"`portunus-server serve --shards {res.shards}`, default log level; load average "
        f"{m['loadavg'][0]} at start, {m['loadavg_end'][0]} at the end (other jobs shared the machine).",
        "`python -m bench.control_plane"
        + (" --quick" if args.quick else "")
        + "` (bench/control_plane.py).",
        "",
        "| target | measured | target | |",
        "|---|---|---|---|",
    ]
    for what, unit, value, target, ok in res.verdicts():
        lines.append(
            f"| {what} | {_fmt(value, unit)} | ≤ {_fmt(target, unit)} | {'PASS' if ok else 'MISS'} |"
        )
    lines += ["", "| series | n | min | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|"]
    for key in (
        "rpc",
        "cli",
        "cli_floor",
        "ready_empty",
        "ready",
        "health",
        "bound",
        "list",
        "list_fresh",
    ):
        s = res.series.get(key)
        if s is None or not s.values:
            continue
        d = s.summary()
        lines.append(
            f"| {s.name} | {d['n']} | "
            + " | ".join(_fmt(d[k], s.unit) for k in ("min", "p50", "p90", "p99", "max"))
            + " |"
        )
    lines += [
        "",
        "Method:",
        f"- RPC: {len(res.series['rpc'].values)} sequential `rules.push` calls via `call_sync` (new "
        "socket connection per call, like the CLI), each on a fresh port to one echo origin; the reply "
        "comes once the data plane confirmed `active`. Rules accumulate (no removal between pushes). "
        f"Ports not accepting a connect right after their reply: {res.facts['rpc_not_accepting']}.",
        f"- CLI: {len(res.series['cli'].values)} runs of `portunus-server push-rule local PORT HOST:PORT`, "
        "whole process wall clock (interpreter start, imports, token file, RPC, output); the "
        "`--version` row is the floor any CLI invocation pays before talking to the server.",
        f"- READY: {res.facts['stored']} single-port rules stored, `serve` stopped (SIGTERM) and started "
        f"{len(res.series['ready'].values)} times with a fake `$NOTIFY_SOCKET`; times from spawn. States "
        f"after the starts: {', '.join(res.facts['states_after_start'])}. Largest lag of /v1/health 200 behind "
        f"READY=1: {res.facts['ready_before_health_ms']} ms (READY is sent before the control socket is up, "
        "see tests/e2e/server/test_startup.py::test_ready_only_once_health_answers); most stored ports "
        f"not yet in LISTEN when READY=1 was read: {res.facts['ports_missing_at_ready']}.",
        f"- List: `GET /v1/rules` with {res.facts['stored']} rules ({res.facts['list_bytes'] // 1024} KiB "
        "of JSON), bearer token, sequential, after 5 warm-ups.",
        "",
    ]
    return "\n".join(lines)


def to_json(res: Results) -> dict[str, Any]:
    return {
        "date": res.date,
        "machine": res.machine,
        "shards": res.shards,
        "facts": res.facts,
        "series": {
            k: s.summary() | {"samples": [round(x, 4) for x in s.values]}
            for k, s in res.series.items()
        },
        "targets": [
            {"what": w, "unit": u, "value": v, "target": t, "pass": ok}
            for w, u, v, t, ok in res.verdicts()
        ],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.control_plane",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rpc-pushes", type=int, default=500)
    p.add_argument("--cli-pushes", type=int, default=100)
    p.add_argument("--stored", type=int, default=1000)
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--lists", type=int, default=300)
    p.add_argument("--shards", type=int, default=None, help="server shards (default: one per CPU)")
    p.add_argument(
        "--quick", action="store_true", help="100 RPC / 20 CLI pushes, 3 starts, 100 lists"
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "control_plane.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw samples here")
    args = p.parse_args(argv)
    if args.quick:
        args.rpc_pushes, args.cli_pushes, args.starts, args.lists = 100, 20, 3, 100
    return args


def report(
    args: argparse.Namespace,
    res: Any,
    render_fn: Callable[..., str],
    to_json_fn: Callable[[Any], Any],
) -> int:
    """Write ``--out`` (and ``--json``), print the report; exit 1 if a target is missed.
    Shared by the standalone entry points of control_plane and edge_clients."""
    text = render_fn(res, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps(to_json_fn(res), indent=2) + "\n")
    print(text)
    return 0 if all(ok for *_, ok in res.verdicts()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report(args, measure(args), render, to_json)


def run(settings: Settings) -> list[BenchResult]:
    """For ``bench.run``: the full counts (quick: ``--quick`` counts)."""
    args = parse_args(["--quick"] if settings.quick else [])
    res = measure(args)
    out: list[BenchResult] = []
    for key, title in (
        ("rpc", "Push → active over the control socket"),
        ("cli", "Push → active via the CLI"),
        ("ready", f"serve start → READY with {res.facts['stored']} rules"),
        ("list", f"GET /v1/rules with {res.facts['stored']} rules"),
    ):
        s = res.series[key]
        unit = "s" if s.unit == "s" else "ms"
        out.append(
            BenchResult(
                name=f"control_plane_{key}",
                title=title,
                method=s.name + " (see bench/control_plane.py)",
                metrics=[Metric("value", f"{s.name} ({unit})", False)],
                per_forwarder={"portunus": [{"value": v} for v in s.values]},
                extra={"summary": s.summary(), "targets": to_json(res)["targets"]},
            )
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
