"""Soak: does a busy server stay flat?  (a bench script, not a CI test)

    python -m bench.soak [--minutes 10] [--warmup 2] [--conn-rate 500] [--udp-flows 20]
                         [--churn-every 0.5] [--reconnect-every 60] [--shards 2]

One ``portunus-server serve`` (temp data dir, loopback) and one real edge client
(``portunus-client``, enrolled against it) run for ``--minutes`` under, all at once:

- **rule churn**: a rule pushed and removed on a spare port every ``--churn-every`` s
  (over the control socket, waiting for the ack, as the CLI does);
- **new TCP connections**: ``--conn-rate`` per second, each one line echoed through a
  server rule and closed (paced by 4 threads);
- **UDP flows**: ``--udp-flows`` flows through a UDP rule, one datagram each every
  100 ms, each flow replaced by a new one (new source port) every 5 s;
- **edge traffic**: 20 connections/s through a rule on the edge client, which is told
  to reconnect (SIGHUP) every ``--reconnect-every`` s.

Every 10 s the fd count and RSS of every process of both trees are sampled.  After
the warm-up, each process's first and last minute are compared (medians): flat means
within ±5 %.  Unexpected errors = failed TCP connects or echoes, failed pushes or
removes, edge connections failing outside the second after a reconnect.  UDP loss
is reported, not counted (datagrams may be dropped under load by design).

Writes bench/results/soak.md (the table) and bench/results/soak.json, and puts the
table into bench/RESULTS.md under "## Soak" (bench/report.py keeps it when the
other benchmarks regenerate that file).  Exit 1 if not flat or any unexpected error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import raise_nofile  # noqa: E402
from portunus.control.rpc.caller import call_sync  # noqa: E402
from portunus.errors import PortunusError  # noqa: E402
from tests.e2e.edge.clients import ClientProc, enroll  # noqa: E402
from tests.e2e.support import LOOPBACK, PortAllocator, ServerProc, title_of  # noqa: E402

RESULTS = REPO / "bench" / "results"
RESULTS_MD = REPO / "bench" / "RESULTS.md"
SAMPLE_EVERY = 10.0
FLAT = 0.05


@dataclass
class Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    tcp_ok: int = 0
    tcp_errors: list[str] = field(default_factory=list)
    edge_ok: int = 0
    edge_errors: list[str] = field(default_factory=list)
    edge_tolerated: int = 0
    udp_sent: int = 0
    udp_received: int = 0
    pushes: int = 0
    removes: int = 0
    churn_errors: list[str] = field(default_factory=list)
    reconnects: int = 0

    def add(self, name: str, value: Any = 1) -> None:
        with self.lock:
            current = getattr(self, name)
            if isinstance(current, list):
                if len(current) < 1000:
                    current.append(value)
            else:
                setattr(self, name, current + value)


def echo_once(port: int, timeout: float = 5.0) -> None:
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(b"soak\n")
        got = b""
        while len(got) < 5:
            chunk = s.recv(5 - len(got))
            if not chunk:
                raise ConnectionError(f"closed after {len(got)} bytes")
            got += chunk
        if got != b"soak\n":
            raise ValueError(f"echo mismatch {got!r}")


def paced(stop: threading.Event, rate: float, action: Any) -> None:
    """Call ``action()`` ``rate`` times per second until ``stop`` (no catch-up bursts)."""
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        action()
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        elif delay < -1.0:
            next_at = time.monotonic()


def udp_echo_server(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(2048)
        except TimeoutError:
            continue
        except OSError:
            return
        with contextlib.suppress(OSError):
            sock.sendto(data, peer)


def udp_flow(port: int, stop: threading.Event, c: Counters) -> None:
    while not stop.is_set():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((LOOPBACK, port))
            s.settimeout(0.1)
            born = time.monotonic()
            while not stop.is_set() and time.monotonic() - born < 5.0:
                with contextlib.suppress(OSError):
                    s.send(b"soak-udp")
                    c.add("udp_sent")
                    if s.recv(64) == b"soak-udp":
                        c.add("udp_received")
                stop.wait(0.1)


def tree(root: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(root)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def label(p: psutil.Process, root_name: str) -> str:
    """``server control``, ``server shard 0``, ``edge supervisor``…"""
    try:
        title = title_of(p)
    except psutil.Error:
        title = "?"
    if title.startswith("portunus: "):
        title = title[len("portunus: ") :]
    elif "portunus-server" in title or "portunus-client" in title:
        title = "supervisor"
    return f"{root_name} {title}".strip()


def sample(roots: dict[str, int]) -> dict[str, tuple[int, int]]:
    """``{process label: (fds, rss bytes)}`` of both trees right now."""
    out: dict[str, tuple[int, int]] = {}
    for name, pid in roots.items():
        for p in tree(pid):
            with contextlib.suppress(psutil.Error):
                key = label(p, name)
                while key in out:
                    key += "'"
                out[key] = (p.num_fds(), p.memory_info().rss)
    return out


def med(values: list[int]) -> float:
    return float(statistics.median(values)) if values else 0.0


def with_shard_sums(s: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """``s`` plus a ``<tree> shards (sum)`` entry per tree with several shards: UDP
    flow sockets land on either shard (SO_REUSEPORT), so one shard's fd count moves
    with its share of the flows while the sum shows whether fds leak."""
    out = dict(s)
    for tree in sorted({name.split(" ", 1)[0] for name in s}):
        shards = [v for name, v in s.items() if name.startswith(f"{tree} shard ")]
        if len(shards) > 1:
            out[f"{tree} shards (sum)"] = (sum(v[0] for v in shards), sum(v[1] for v in shards))
    return out


def analyse(
    samples: list[tuple[float, dict[str, tuple[int, int]]]], warmup: float
) -> list[dict[str, Any]]:
    """Per process: median fds/RSS over the first and the last minute after warm-up."""
    after = [(t, with_shard_sums(s)) for t, s in samples if t >= warmup]
    if not after:
        return []
    t0, t_end = after[0][0], after[-1][0]
    first = [s for t, s in after if t < t0 + 60]
    last = [s for t, s in after if t > t_end - 60]
    rows = []
    for name in sorted(set().union(*(s.keys() for _, s in after))):
        f_fds = [s[name][0] for s in first if name in s]
        l_fds = [s[name][0] for s in last if name in s]
        f_rss = [s[name][1] for s in first if name in s]
        l_rss = [s[name][1] for s in last if name in s]
        if not (f_fds and l_fds):
            rows.append({"process": name, "note": "not present for the whole run (restarted?)"})
            continue
        row = {
            "process": name,
            "fds_first": med(f_fds),
            "fds_last": med(l_fds),
            "rss_first_mib": med(f_rss) / 2**20,
            "rss_last_mib": med(l_rss) / 2**20,
        }
        row["fds_change"] = (row["fds_last"] - row["fds_first"]) / max(row["fds_first"], 1)
        row["rss_change"] = (row["rss_last_mib"] - row["rss_first_mib"]) / max(
            row["rss_first_mib"], 1e-9
        )
        row["flat"] = abs(row["fds_change"]) <= FLAT and abs(row["rss_change"]) <= FLAT
        rows.append(row)
    return rows


def render(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    c: Counters,
    seconds: float,
    load: tuple[Any, Any],
) -> str:
    unexpected = len(c.tcp_errors) + len(c.edge_errors) + len(c.churn_errors)
    lines = [
        "## Soak",
        "",
        f"`python -m bench.soak --minutes {args.minutes:g}` — {seconds / 60:.1f} min: rule push/remove every "
        f"{args.churn_every:g} s, {args.conn_rate} new TCP connections/s (one echoed line each), "
        f"{args.udp_flows} UDP flows (10 datagrams/s each, a new flow every 5 s), 20 connections/s through an "
        f"edge client that reconnects every {args.reconnect_every:g} s; {args.shards} shard(s). fds and RSS of "
        f"every process sampled every {SAMPLE_EVERY:g} s; first vs last minute after a {args.warmup:g}-min "
        f"warm-up (medians); flat = within ±{FLAT:.0%}. Load average at start {load[0]}, at end {load[1]}.",
        "",
        "| process | fds first → last | Δ fds | RSS MiB first → last | Δ RSS | flat |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['process']} | – | – | – | – | {r['note']} |")
            continue
        lines.append(
            f"| {r['process']} | {r['fds_first']:.0f} → {r['fds_last']:.0f} | {r['fds_change']:+.1%} | "
            f"{r['rss_first_mib']:.1f} → {r['rss_last_mib']:.1f} | {r['rss_change']:+.1%} | "
            f"{'yes' if r['flat'] else '**no**'} |"
        )
    udp_loss = 1 - c.udp_received / c.udp_sent if c.udp_sent else 0.0
    lines += [
        "",
        f"Traffic: {c.tcp_ok:,} TCP connections echoed ({c.tcp_ok / seconds:,.0f}/s), {c.edge_ok:,} through the "
        f"edge client, {c.udp_sent:,} UDP datagrams ({udp_loss:.2%} not echoed), {c.pushes:,} pushes and "
        f"{c.removes:,} removes, {c.reconnects} edge reconnects ({c.edge_tolerated} edge connections failed "
        "within 2 s of a reconnect, tolerated).",
        f"Unexpected errors: {unexpected} (TCP {len(c.tcp_errors)}, edge {len(c.edge_errors)}, "
        f"churn {len(c.churn_errors)})"
        + (
            f"; first: {(c.tcp_errors + c.edge_errors + c.churn_errors)[:3]}" if unexpected else "."
        ),
        "",
    ]
    return "\n".join(lines)


def put_in_results(section: str) -> None:
    """Replace (or append) the "## Soak" section of bench/RESULTS.md."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Portunus benchmarks\n"
    start = text.find("\n## Soak\n")
    if start >= 0:
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + "\n" + section + (text[nxt:] if nxt >= 0 else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS_MD.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument(
        "--warmup", type=float, default=2.0, help="minutes excluded from the comparison"
    )
    ap.add_argument("--conn-rate", type=int, default=500)
    ap.add_argument("--udp-flows", type=int, default=20)
    ap.add_argument("--churn-every", type=float, default=0.5)
    ap.add_argument("--reconnect-every", type=float, default=60.0)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--no-results-md", action="store_true", help="write bench/results/soak.md only")
    args = ap.parse_args()
    raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    ports = PortAllocator()
    srv = ServerProc(
        workdir=work,
        data_dir=work / "data",
        ports=ports,
        shards=args.shards,
        name="server",
        settings={"shutdown_drain_timeout_secs": 1},
    )
    procs: list[Any] = [srv]
    stop = threading.Event()
    c = Counters()
    threads: list[threading.Thread] = []
    origin = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "echo_origin.py"), str(ports.port())]
    )
    try:
        origin_port = int(origin.args[-1])
        udp_origin = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp_origin.bind((LOOPBACK, 0))
        threads.append(
            threading.Thread(target=udp_echo_server, args=(udp_origin, stop), daemon=True)
        )
        srv.start()
        srv.wait_ready(timeout=60)
        token = srv.token

        def rpc(method: str, params: dict[str, Any]) -> Any:
            return call_sync(srv.socket_path, token, method, params, 30.0)

        tcp_port, udp_port, churn_port, edge_port = ports.ports(4)
        rpc(
            "rules.push",
            {
                "client": "local",
                "listen_port": tcp_port,
                "targets": [{"host": LOOPBACK, "port": origin_port}],
            },
        )
        rpc(
            "rules.push",
            {
                "client": "local",
                "protocol": "udp",
                "listen_port": udp_port,
                "targets": [{"host": LOOPBACK, "port": udp_origin.getsockname()[1]}],
            },
        )
        # The edge client: enrolled like an operator would, then a rule on it.
        minted = rpc("clients.enroll", {"name": "soak-edge", "address": LOOPBACK})
        bundle = work / "edge.json"
        res = enroll(minted["uri"], bundle)
        if res.returncode != 0:
            raise RuntimeError(f"enroll failed: {res.stderr}")
        client = ClientProc(
            workdir=work, bundle=bundle, metrics_port=ports.port(), shards=1, name="edge"
        )
        procs.append(client)
        client.start()
        client.wait_ready(60)
        client.wait_connected(timeout=30)
        rpc(
            "rules.push",
            {
                "client": "soak-edge",
                "listen_port": edge_port,
                "targets": [{"host": LOOPBACK, "port": origin_port}],
                "ack_timeout": 30,
            },
        )
        last_reconnect = [0.0]

        def tcp() -> None:
            try:
                echo_once(tcp_port)
                c.add("tcp_ok")
            except (OSError, ValueError) as exc:
                c.add("tcp_errors", f"{time.strftime('%H:%M:%S')} {exc!r}")

        def edge() -> None:
            try:
                echo_once(edge_port)
                c.add("edge_ok")
            except (OSError, ValueError) as exc:
                if time.monotonic() - last_reconnect[0] < 2.0:
                    c.add("edge_tolerated")
                else:
                    c.add("edge_errors", f"{time.strftime('%H:%M:%S')} {exc!r}")

        def churn() -> None:
            try:
                rule = rpc(
                    "rules.push",
                    {
                        "client": "local",
                        "listen_port": churn_port,
                        "targets": [{"host": LOOPBACK, "port": origin_port}],
                    },
                )
                c.add("pushes")
                rpc("rules.remove", {"id": rule["id"]})
                c.add("removes")
                deadline = time.monotonic() + 10
                while any(
                    r["listen_port"] == churn_port
                    for r in rpc("rules.list", {"limit": 1000})["rules"]
                ):
                    if time.monotonic() > deadline:
                        raise TimeoutError("removed rule still listed after 10 s")
                    time.sleep(0.02)
            except (PortunusError, OSError) as exc:
                c.add("churn_errors", f"{time.strftime('%H:%M:%S')} {exc}")

        for _ in range(4):
            threads.append(
                threading.Thread(target=paced, args=(stop, args.conn_rate / 4, tcp), daemon=True)
            )
        threads.append(threading.Thread(target=paced, args=(stop, 20, edge), daemon=True))
        threads.append(
            threading.Thread(target=paced, args=(stop, 1 / args.churn_every, churn), daemon=True)
        )
        for _ in range(args.udp_flows):
            threads.append(threading.Thread(target=udp_flow, args=(udp_port, stop, c), daemon=True))
        load_start = [round(x, 2) for x in os.getloadavg()]
        for t in threads:
            t.start()
        roots = {"server": srv.pid, "edge": client.pid}
        samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        t_start = time.monotonic()
        next_reconnect = t_start + args.reconnect_every
        while (elapsed := time.monotonic() - t_start) < args.minutes * 60:
            samples.append((elapsed, sample(roots)))
            wake = min(time.monotonic() + SAMPLE_EVERY, t_start + args.minutes * 60)
            while time.monotonic() < wake:
                if time.monotonic() >= next_reconnect:
                    last_reconnect[0] = time.monotonic()
                    os.kill(client.pid, signal.SIGHUP)
                    c.add("reconnects")
                    next_reconnect += args.reconnect_every
                time.sleep(0.2)
            print(
                f"soak: {elapsed / 60:.1f} min, tcp {c.tcp_ok} ok / {len(c.tcp_errors)} errors, "
                f"churn {c.pushes}, edge {c.edge_ok}",
                flush=True,
            )
        samples.append((time.monotonic() - t_start, sample(roots)))
        seconds = time.monotonic() - t_start
        stop.set()
        for t in threads:
            t.join(10)
        load_end = [round(x, 2) for x in os.getloadavg()]
        rows = analyse(samples, args.warmup * 60)
        section = render(args, rows, c, seconds, (load_start, load_end))
        (RESULTS / "soak.md").write_text(section)
        (RESULTS / "soak.json").write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "seconds": seconds,
                    "rows": rows,
                    "samples": samples,
                    "counters": {k: v for k, v in vars(c).items() if k != "lock"},
                },
                indent=1,
                default=str,
            )
        )
        if not args.no_results_md:
            put_in_results(section)
        print(section)
        unexpected = len(c.tcp_errors) + len(c.edge_errors) + len(c.churn_errors)
        flat = all(r.get("flat", False) for r in rows)
        return 0 if flat and unexpected == 0 else 1
    finally:
        stop.set()
        for p in procs:
            with contextlib.suppress(Exception):
                p.cleanup()
        origin.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            origin.wait(5)


if __name__ == "__main__":
    raise SystemExit(main())
