"""Edge-client scale benchmarks for ``portunus-server serve`` (issue 6 targets).

    python -m bench.edge_clients [--clients 1000] [--lists 300] [--pushes 300]
                                 [--restart-clients 100] [--rules-each 3] [--restarts 3]
                                 [--quick] [--out bench/results/edge_clients.md] [--json F]

Starts its own servers (temp data dirs, loopback ports, ``--shards 1``, default log
level) with the e2e fixture ``tests.e2e.support.ServerProc``, and a fleet of fake
edge clients in one other process (bench/edge_fleet.py: protocol-level fakes over
pinned TLS that ack everything at once).  Measures:

1. **enrollment**: ``--clients`` codes minted with ``clients.enroll`` over the control
   socket (4 threads), then redeemed with the real client code path
   (``portunus.edge.enroll.redeem``, 32 at a time); then the fleet connects at once
   and the time until every fake answered its first ``sync`` is taken.
2. **memory**: RSS (psutil) of the control process and of the whole ``serve`` tree,
   and the control process's fds, before enrollment and with every client connected.
3. **list**: ``clients.list`` over the control socket (``call_sync``, a connection per
   call, as the CLI) and ``GET /v1/clients`` on one keep-alive HTTP connection,
   ``--lists`` sequential requests each after 5 warm-ups; the first answer must show
   every client connected.
4. **push → acked**: ``--pushes`` sequential ``rules.push`` to a random connected fake
   on a fresh port; the reply comes after the client's ``applied`` (state ``active``).
5. **restart**: a second server with ``--restart-clients`` clients holding
   ``--rules-each`` rules each; ``serve`` is stopped (SIGTERM) and spawned again
   ``--restarts`` times; time from spawn until every fake answered a fresh full
   ``sync`` (fakes reconnect with the real client's backoff), and until
   ``clients.list`` shows all connected with every rule ``active``.

Targets: list p99 ≤ 100 ms and push → acked p99 ≤ 100 ms with 1,000 clients;
restart → all reconnected and reconciled ≤ 10 s for 100 clients.  Exit 1 if missed.

For ``bench.run``: ``run(settings) -> list[BenchResult]`` (see the module end).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import machine_info, raise_nofile  # noqa: E402
from bench.control_plane import Series, machine, pct, report, running_server  # noqa: E402
from bench.edge_fleet import Identity  # noqa: E402
from bench.edge_report import fmt, render, to_json  # noqa: E402
from bench.fleet_group import FleetGroup, default_procs  # noqa: E402
from bench.fleet_views import scrape, ui_clients  # noqa: E402
from bench.results import BenchResult, Metric, Settings  # noqa: E402
from portunus.control.rpc.caller import call_sync  # noqa: E402
from portunus.errors import PortunusError  # noqa: E402
from portunus.metrics.catalog import CLIENTS_CONNECTED  # noqa: E402
from tests.e2e.support import LOOPBACK, PortAllocator, ServerProc  # noqa: E402

HERE = Path(__file__).resolve().parent
# Issue 16 (10,000 clients on one server): a page of the list and one client by name are
# fast whatever the fleet; a restart storm reconciles everyone (p99 over the clients).
TARGETS = {
    "list_p99_ms": 50.0,
    "get_p99_ms": 5.0,
    "push_p99_ms": 100.0,
    "restart_p99_s": 30.0,
    "kib_per_client": 20.0,
    "idle_cpu_pct": 5.0,
    "scrape_p99_ms": 1000.0,
}
MiB = 2**20


def log(msg: str) -> None:
    print(f"[edge_clients] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ helpers


def rpc(
    srv: ServerProc, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0
) -> Any:
    return call_sync(srv.socket_path, srv.token, method, params or {}, timeout)


def memory(srv: ServerProc) -> dict[str, float]:
    """RSS in MiB of the control process and of the whole serve tree; control fds."""
    control = srv.child("control")
    root = psutil.Process(srv.pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    assert control is not None
    return {
        "control_rss_mib": control.memory_info().rss / MiB,
        "total_rss_mib": total / MiB,
        "control_fds": float(control.num_fds()),
        "processes": float(len(procs)),
    }


def settled_memory(srv: ServerProc, tries: int = 10) -> dict[str, float]:
    """``memory`` once control's fd count held still for 0.2 s: the connection of the
    start-up readiness call can still be open in control for a moment, and a baseline
    with it counts one fd too many."""
    now = memory(srv)
    for _ in range(tries):
        time.sleep(0.2)
        again = memory(srv)
        if again["control_fds"] == now["control_fds"]:
            return again
        now = again
    return now


def wait_until(cond: Callable[[], bool], what: str, timeout: float, every: float = 0.02) -> float:
    """Poll ``cond``; return the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {timeout:g} s")
        time.sleep(every)
    return time.monotonic()


def enroll(
    srv: ServerProc, fleet: FleetGroup, n: int, prefix: str
) -> tuple[list[Identity], str, dict[str, float]]:
    """Mint ``n`` codes and redeem them; returns identities, the pinned fingerprint
    and the timings (seconds)."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        minted = list(
            pool.map(
                lambda i: rpc(
                    srv, "clients.enroll", {"name": f"{prefix}-{i:04d}", "address": LOOPBACK}
                ),
                range(n),
            )
        )
    t_mint = time.monotonic() - t0
    uris = [m["uri"] for m in minted]
    got, t_redeem = fleet.enroll(uris, 32)
    bad = [g for g in got if not isinstance(g, Identity)]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} enrollments failed, first: {bad[0]}")
    fp = parse_qs(urlsplit(uris[0]).query)["fp"][0]
    return [g for g in got if isinstance(g, Identity)], fp, {"mint_s": t_mint, "redeem_s": t_redeem}


def connected_count(srv: ServerProc) -> int:
    """Remote clients connected, from the list's index-backed ``total`` (one call)."""
    total = rpc(srv, "clients.list", {"connected": True, "limit": 1})["total"]
    return int(total) - (1 if rpc(srv, "clients.get", {"id": "local"})["connected"] else 0)


def tracebacks(srv: ServerProc) -> list[str]:
    """Unhandled exceptions in the server's log: traceback fields and asyncio's
    'Fatal error' / 'exception was never retrieved' lines."""
    bad = []
    for line in srv.stderr_text().splitlines():
        if "Traceback" in line or "Fatal error" in line or "never retrieved" in line:
            bad.append(line[:300])
    return bad


def _cpu(procs: list[psutil.Process | None]) -> float:
    """User + system CPU seconds of ``procs`` so far (a gone one counts 0)."""
    total = 0.0
    for p in procs:
        if p is None:
            continue
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.Error:
            continue
    return total


def tree_cpu(srv: ServerProc) -> float:
    """CPU seconds of the whole ``serve`` tree since it started (children still alive)."""
    try:
        root = psutil.Process(srv.pid)
        return _cpu([root, *root.children(recursive=True)])
    except psutil.Error:
        return 0.0


def storm_failures(
    status: dict[str, tuple[bool, int, int, float, int, int, str, int]],
    before: dict[str, int],
    srv: ServerProc,
) -> dict[str, Any]:
    """Failed connect attempts in a restart (each one costs the fake a backoff step):
    how many, how many fakes had any, their most common last error, and the
    gateway's pre-auth refusals by reason, read from control's counter file (a
    scrape of /metrics with 30,000 rules would cost the harness seconds)."""
    from collections import Counter

    from prometheus_client.multiprocess import MultiProcessCollector

    failed = {cid: v[5] - before.get(cid, 0) for cid, v in status.items()}
    errors = Counter(status[cid][6][:80] for cid, n in failed.items() if n > 0)
    files = [str(p) for p in (srv.runtime_dir / "metrics").glob("counter_*.db")]
    refused: Counter[str] = Counter()
    for family in MultiProcessCollector.merge(files, accumulate=True) if files else []:
        for sample in family.samples:
            if sample.name == "portunus_edge_preauth_refused_total":
                refused[sample.labels.get("reason", "")] += int(sample.value)
    return {
        "attempts_failed": sum(failed.values()),
        "fakes_failed": sum(1 for n in failed.values() if n > 0),
        "max_per_fake": max(failed.values(), default=0),
        "last_errors": errors.most_common(3),
        "preauth_refused": {k: v for k, v in refused.items() if v},
    }


# ------------------------------------------------------------------ 1-4: many clients


@dataclass
class Results:
    date: str
    machine: dict[str, Any]
    clients: int
    series: dict[str, Series] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def verdicts(self) -> list[tuple[str, str, float, float, bool]]:
        n, f = self.clients, self.facts
        out = [
            (
                f"`clients.list` page (100) p99, {n} connected (control socket)",
                "ms",
                pct(self.series["list_rpc"].values, 99),
                TARGETS["list_p99_ms"],
            ),
            (
                f"`GET /v1/clients` page (100) p99, {n} connected (HTTP keep-alive)",
                "ms",
                pct(self.series["list_http"].values, 99),
                TARGETS["list_p99_ms"],
            ),
            (
                f"`clients.get` by name p99, {n} connected (control socket)",
                "ms",
                pct(self.series["get_rpc"].values, 99),
                TARGETS["get_p99_ms"],
            ),
            (
                f"Web UI `GET /clients` page p99, {n} connected",
                "ms",
                pct(self.series["ui_clients"].values, 99),
                TARGETS["list_p99_ms"],
            ),
            (
                f"`GET /metrics` scrape p99, {n} connected",
                "ms",
                pct(self.series["scrape"].values, 99),
                TARGETS["scrape_p99_ms"],
            ),
            (
                f"`{CLIENTS_CONNECTED.name}` series, {n} connected",
                "series",
                float(f["scrape_connected_series"]),
                1.0,
            ),
            (
                f"push → acked p99, {n} connected",
                "ms",
                pct(self.series["push"].values, 99),
                TARGETS["push_p99_ms"],
            ),
            (
                f"control RSS growth per idle connected client, {n} connected",
                "KiB",
                f["kib_per_client"],
                TARGETS["kib_per_client"],
            ),
            (
                f"control CPU with {n} idle links",
                "%",
                f["control_idle_cpu_pct"],
                TARGETS["idle_cpu_pct"],
            ),
            (
                f"restart → {f['restart_clients']} × {f['restart_rules_each']} rules reconnected + reconciled, "
                f"p99 over clients (worst of {len(self.series['restart_p99'].values)} restarts)",
                "s",
                max(self.series["restart_p99"].values),
                TARGETS["restart_p99_s"],
            ),
            (
                "unhandled exceptions in the server logs (enrollment + restarts)",
                "lines",
                float(f["server_tracebacks"]),
                0.0,
            ),
        ]
        return [(w, u, v, t, v <= t) for w, u, v, t in out]


def bench_many(res: Results, srv: ServerProc, fleet: FleetGroup, args: argparse.Namespace) -> None:
    n = args.clients
    res.facts["mem_empty"] = settled_memory(srv)
    log(f"enrolling {n} clients")
    idents, fp, times = enroll(srv, fleet, n, "fake")
    res.facts.update(times)
    host_port = (LOOPBACK, srv.control_port)
    t0 = time.monotonic()
    fleet.connect(*host_port, fp, idents, not args.legacy_link)

    def all_synced() -> bool:
        st = fleet.status()
        return len(st) == n and all(s[0] and s[2] >= 1 for s in st.values())

    res.facts["connect_all_s"] = wait_until(all_synced, f"{n} fakes synced", 300, 0.1) - t0
    wait_until(lambda: connected_count(srv) == n, f"{n} clients listed as connected", 60, 0.2)
    time.sleep(12)  # one heartbeat + stats round from everyone before memory is read
    res.facts["mem_connected"] = memory(srv)
    res.facts["kib_per_client"] = (
        (res.facts["mem_connected"]["control_rss_mib"] - res.facts["mem_empty"]["control_rss_mib"])
        * 1024
        / n
    )
    control = srv.child("control")
    assert control is not None
    res.facts["control_nofile"] = list(control.rlimit(psutil.RLIMIT_NOFILE))
    c0, w0 = sum(control.cpu_times()[:2]), time.monotonic()
    time.sleep(args.idle_secs)  # idle links only: pings + stats every 5 s from each fake
    res.facts["control_idle_cpu_pct"] = (
        100 * (sum(control.cpu_times()[:2]) - c0) / (time.monotonic() - w0)
    )
    log(f"{args.lists} x clients.list / GET /v1/clients pages with {n} connected")
    # A page at a random place in the list: the cursors of a full walk, taken first.
    cursors: list[str | None] = [None]
    t = time.perf_counter()
    body = rpc(srv, "clients.list", {"limit": 1000})
    while body["next_cursor"]:
        cursors.append(body["next_cursor"])
        body = rpc(srv, "clients.list", {"limit": 1000, "cursor": body["next_cursor"]})
    res.facts["walk_all_s"] = time.perf_counter() - t
    res.facts["walk_pages"] = len(cursors)
    rng = random.Random(16)
    s = Series(
        f"`clients.list` one page (default 100, random cursor), {n} connected (connection per call)",
        "ms",
    )
    for i in range(args.lists + 5):
        params = {"cursor": c} if (c := rng.choice(cursors)) else {}
        t = time.perf_counter()
        body = rpc(srv, "clients.list", params)
        took = (time.perf_counter() - t) * 1000
        if i == 0:
            res.facts["list_bytes"] = len(json.dumps(body))
        if i >= 5:
            s.values.append(took)
    up = connected_count(srv)
    if up != n:
        raise RuntimeError(f"clients.list total shows {up} connected, expected {n}")
    res.series["list_rpc"] = s
    g = Series(f"`clients.get` one client by name, {n} connected (connection per call)", "ms")
    for i in range(args.lists + 5):
        name = f"fake-{rng.randrange(n):04d}"
        t = time.perf_counter()
        one = rpc(srv, "clients.get", {"id": name})
        took = (time.perf_counter() - t) * 1000
        if not one.get("connected"):
            raise RuntimeError(f"clients.get {name}: not connected: {one}")
        if i >= 5:
            g.values.append(took)
    res.series["get_rpc"] = g
    res.series["list_http"] = http_list(srv, args.lists, n)
    log(f"{args.lists} x Web UI /clients pages and {args.scrapes} x /metrics with {n} connected")
    res.series["ui_clients"], res.facts["ui_client_rows"] = ui_clients(srv, args.lists, n)
    res.series["scrape"], expo = scrape(srv, args.scrapes, n)
    res.facts["scrape_bytes"] = expo.size
    res.facts["scrape_samples"] = expo.samples
    res.facts["scrape_connected_series"] = expo.families[CLIENTS_CONNECTED.name]
    log(f"{args.pushes} pushes to random connected fakes")
    res.series["push"] = bench_push(srv, [i.client_id for i in idents], args.pushes)
    res.facts["mem_after_pushes"] = memory(srv)
    st = fleet.status()
    res.facts["reconnects_during_run"] = sum(max(0, v[1] - 1) for v in st.values())
    res.facts["fleet_rss_mib"] = sum(psutil.Process(p).memory_info().rss for p in fleet.pids) / MiB
    res.facts["busy_refusals"] = sum(v[7] for v in st.values())
    res.facts["tracebacks_many"] = tracebacks(srv)
    fleet.disconnect()


def http_list(srv: ServerProc, n: int, expect: int) -> Series:
    headers = {"Authorization": f"Bearer {srv.token}"}
    s = Series(
        f"`GET /v1/clients` one page (default 100), {expect} connected, keep-alive connection", "ms"
    )
    conn = http.client.HTTPConnection(LOOPBACK, srv.api_port, timeout=30)
    try:
        for i in range(n + 5):
            t = time.perf_counter()
            conn.request(
                "GET",
                "/v1/clients" if i % 2 else "/v1/clients?connected=true&name_prefix=fake-",
                headers=headers,
            )
            resp = conn.getresponse()
            body = resp.read()
            took = (time.perf_counter() - t) * 1000
            if resp.status != 200:
                raise RuntimeError(f"GET /v1/clients answered {resp.status}: {body[:300]!r}")
            if i == 0:
                up = json.loads(body)["total"]
                if up != expect:
                    raise RuntimeError(
                        f"GET /v1/clients?connected=true&name_prefix=fake- total {up}, "
                        f"expected {expect}"
                    )
            if i >= 5:
                s.values.append(took)
    finally:
        conn.close()
    return s


def bench_push(srv: ServerProc, client_ids: list[str], n: int) -> Series:
    """Pushes to remote clients bind nothing on this machine, so the listen ports
    only need to be unique per client: a counter does."""
    rng = random.Random(6)
    ports = iter(range(10000, 65536))
    s = Series(
        f"push → acked (`rules.push` to a random one of {len(client_ids)} connected fakes)", "ms"
    )
    for i in range(n + 5):
        params = {
            "client": rng.choice(client_ids),
            "listen_port": next(ports),
            "targets": [{"host": LOOPBACK, "port": 9}],
        }
        t = time.perf_counter()
        rule = rpc(srv, "rules.push", params, 10.0)
        took = (time.perf_counter() - t) * 1000
        if rule.get("state") != "active":
            raise RuntimeError(f"push {i} answered {rule.get('state')}: {rule}")
        if i >= 5:
            s.values.append(took)
    return s


# ------------------------------------------------------------------ 5: restart


def bench_restart(
    res: Results, srv: ServerProc, fleet: FleetGroup, args: argparse.Namespace
) -> None:
    n, each = args.restart_clients, args.rules_each
    log(f"restart: enrolling {n} clients with {each} rules each")
    idents, fp, _ = enroll(srv, fleet, n, "rs")
    fleet.connect(LOOPBACK, srv.control_port, fp, idents, not args.legacy_link)
    wait_until(lambda: connected_count(srv) == n, f"{n} connected", 300, 0.5)

    def push_all(ident: Identity) -> None:
        for k in range(each):
            try:
                rpc(
                    srv,
                    "rules.push",
                    {
                        "client": ident.client_id,
                        "listen_port": 10001 + k,
                        "targets": [{"host": LOOPBACK, "port": 9}],
                    },
                    30.0,
                )
            except PortunusError as exc:
                # On a loaded machine a fake may answer after the server's 2 s: the
                # rule is stored and turns active when it does (checked below).
                if exc.code != "ack_timeout":
                    raise

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(push_all, idents))
    want_ids = {i.client_id for i in idents}
    fakes = Series(f"spawn → every fake answered a full sync ({n} clients × {each} rules)", "s")
    listed = Series(
        f"spawn → `clients.list` all {n} connected and all {n * each} rules active", "s"
    )
    stops = Series("SIGTERM → serve exited", "s")
    first = Series("spawn → first fake re-synced", "s")
    p99s = Series(f"spawn → p99 over the {n} fakes of their re-sync", "s")
    for r in range(args.restarts):
        t = time.monotonic()
        rc = srv.stop(signal.SIGTERM, timeout=60)
        stops.values.append(time.monotonic() - t)
        if rc != 0:
            raise RuntimeError(f"serve exited {rc} on SIGTERM\n{srv.stderr_tail()}")
        fleet_procs = [psutil.Process(p) for p in fleet.pids]
        failures0 = {cid: v[5] for cid, v in fleet.status().items()}
        harness = psutil.Process()
        fleet0, harness0 = _cpu(fleet_procs), _cpu([harness])
        t0 = time.monotonic()
        srv.start()

        def fresh(t0: float = t0) -> list[float]:
            st = fleet.status()
            return [
                v[3]
                for cid, v in st.items()
                if cid in want_ids and v[0] and v[3] > t0 and v[4] == each
            ]

        # Every 0.5 s: a status is a 10,000-entry map pickled by every fleet process, and
        # the fakes stamp their own sync times, so polling faster only takes CPU from
        # the storm being measured.
        wait_until(lambda: len(fresh()) == n, f"{n} fakes re-synced after restart {r}", 300, 0.5)
        done = fresh()
        res.facts.setdefault("restart_failures", []).append(
            storm_failures(fleet.status(), failures0, srv)
        )
        res.facts.setdefault("restart_cpu", []).append(
            {
                "wall_s": max(done) - t0,
                "serve_tree_s": tree_cpu(srv),
                "control_s": _cpu([srv.child("control")]),
                "fleet_s": _cpu(fleet_procs) - fleet0,
                "harness_s": _cpu([harness]) - harness0,
            }
        )
        fakes.values.append(max(done) - t0)
        first.values.append(min(done) - t0)
        p99s.values.append(pct([d - t0 for d in done], 99))

        def reconciled() -> bool:
            try:
                up = connected_count(srv)
                # index counts (rules.list total), not a listing of every rule
                every = rpc(srv, "rules.list", {"limit": 1}, timeout=60)["total"]
                active = rpc(srv, "rules.list", {"state": "active", "limit": 1}, timeout=60)
            except PortunusError:
                return False
            return up == n and every == n * each and active["total"] == every

        listed.values.append(wait_until(reconciled, "list shows all reconciled", 120, 0.2) - t0)
        srv.wait_ready(timeout=60)
    res.series.update(
        restart=fakes,
        restart_listed=listed,
        restart_first=first,
        restart_stop=stops,
        restart_p99=p99s,
    )
    st = fleet.status()
    res.facts["restart_busy_refusals"] = sum(v[7] for v in st.values() if v)
    res.facts["tracebacks_restart"] = tracebacks(srv)
    res.facts["server_tracebacks"] = len(res.facts["tracebacks_restart"]) + len(
        res.facts["tracebacks_many"]
    )
    res.facts["restart_clients"] = n
    res.facts["restart_rules_each"] = each
    fleet.disconnect()


# ------------------------------------------------------------------ driver


def measure(args: argparse.Namespace) -> Results:
    raise_nofile()
    info = machine_info()
    mach = machine() | {k: info[k] for k in ("cpu_model", "memory_gib", "commit")}
    res = Results(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), mach, args.clients)
    ports = PortAllocator()
    tmp = Path(tempfile.mkdtemp(prefix="portunus-edge-bench-"))
    procs = args.fleet_procs or default_procs(max(args.clients, args.restart_clients))
    res.facts["fleet_procs"] = procs
    fleet = FleetGroup(procs)
    try:
        extra = {"edge_preauth_max_per_source": args.per_source} if args.per_source else None
        res.facts["per_source"] = args.per_source or 16
        with running_server(tmp / "many", ports, 1, extra) as srv:
            bench_many(res, srv, fleet, args)
        with running_server(tmp / "restart", ports, 1, extra) as srv:
            bench_restart(res, srv, fleet, args)
    finally:
        fleet.close()
        ports.close()
        if args.keep_logs:
            log(f"server data dirs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res.machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.edge_clients",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--lists", type=int, default=300)
    p.add_argument("--pushes", type=int, default=300)
    p.add_argument("--scrapes", type=int, default=50, help="timed GET /metrics with the fleet up")
    p.add_argument("--restart-clients", type=int, default=100)
    p.add_argument("--rules-each", type=int, default=3)
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument(
        "--idle-secs", type=float, default=10.0, help="window for the control process's idle CPU"
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' data dirs and logs")
    p.add_argument(
        "--per-source",
        type=int,
        default=None,
        help="edge_preauth_max_per_source for the servers (default: the server's, 16). Every fake "
        "dials from 127.0.0.1, one source; 128 (= the global limit) makes the fleet look like "
        "many hosts, as a real fleet is",
    )
    p.add_argument(
        "--fleet-procs",
        type=int,
        default=None,
        help="processes the fake fleet is spread over (default: one per 2,500 fakes, 1 to 4); "
        "one process saturates a core in a 10,000-client storm and then bounds what is measured",
    )
    p.add_argument(
        "--legacy-link",
        action="store_true",
        help="fakes without quiet_link: ping + stats every 5 s (clients before issue 16)",
    )
    p.add_argument(
        "--quick", action="store_true", help="200 clients, 100 lists / pushes, 3 restarts of 100"
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "edge_clients.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw samples here")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.lists, args.pushes, args.scrapes = 200, 100, 100, 20
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report(args, measure(args), render, to_json)


def run(settings: Settings) -> list[BenchResult]:
    """For ``bench.run``: the full counts (quick: ``--quick`` counts).  Each result's
    ``summary`` carries the p99 (or median) that bench/report.py ``targets()`` checks."""
    args = parse_args(["--quick"] if settings.quick else [])
    res = measure(args)
    targets = to_json(res)["targets"]
    out: list[BenchResult] = []
    for key, title in (
        ("list_rpc", f"clients.list with {res.clients} edge clients connected"),
        ("list_http", f"GET /v1/clients with {res.clients} edge clients connected"),
        ("push", f"Push → acked with {res.clients} edge clients connected"),
        ("restart", f"serve restart → {res.facts['restart_clients']} edge clients reconciled"),
    ):
        s = res.series[key]
        unit = "s" if s.unit == "s" else "ms"
        d = s.summary()
        out.append(
            BenchResult(
                name=f"edge_clients_{key}",
                title=title,
                method=s.name + " (see bench/edge_clients.py)",
                metrics=[Metric("value", "time (s)" if unit == "s" else "latency (ms)", False)],
                notes=[
                    f"{d['n']} samples: p50 {fmt(d['p50'], s.unit)}, p90 {fmt(d['p90'], s.unit)}, "
                    f"p99 {fmt(d['p99'], s.unit)}, max {fmt(d['max'], s.unit)}; control RSS "
                    f"{res.facts['mem_empty']['control_rss_mib']:.0f} MiB idle, "
                    f"{res.facts['mem_connected']['control_rss_mib']:.0f} MiB with {res.clients} connected; "
                    "details in bench/results/edge_clients.md when run as `python -m bench.edge_clients`"
                ],
                per_forwarder={"portunus": [{"value": v} for v in s.values]},
                extra={
                    "summary": s.summary(),
                    "targets": targets,
                    "clients": res.facts["restart_clients"] if key == "restart" else res.clients,
                    "memory": {
                        k: res.facts[k] for k in ("mem_empty", "mem_connected", "mem_after_pushes")
                    },
                },
            )
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
