"""Range-rule push latency: ``rules.push`` of a 100- and a 1024-port range → every port
accepting connections.

    python -m bench.range_push [--reps-100 20] [--reps-1024 5] [--shards N]
                               [--out bench/results/range_push.md]

Starts its own ``portunus-server serve`` (temp data dir, loopback ports, log level
``error`` so refused upstream connects of the probes are not logged), or measures a
running one with ``--socket S --token-file F``.  Each repetition:

1. a fresh block of free ports (never reused within the run) is chosen;
2. a prober thread starts connecting to the block's ports in order, retrying a
   refused port every 0.2 ms and moving on when a connect succeeds;
3. ``rules.push`` goes out on the control socket (``portunus.control.rpc.caller.call_sync``),
   which replies once the rule is ``active``;
4. push → all accepting = from just before the push to the prober's last successful
   connect; push → reply is the RPC round trip alone;
5. the rule is removed and its deletion awaited before the next repetition.

One unmeasured warm-up repetition per size comes first.  Targets (issue 5): 100
ports ≤ 20 ms p50, 1024 ports ≤ 150 ms p50.

For ``bench.run``: ``run(settings) -> list[BenchResult]`` (see the module end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import LOOPBACK, Service, free_port, start_service  # noqa: E402
from bench.results import BenchResult, Metric, Settings  # noqa: E402
from portunus.control.rpc.caller import call_sync  # noqa: E402
from portunus.errors import PortunusError  # noqa: E402

HERE = Path(__file__).resolve().parent
# Below the kernel's ephemeral range (32768+), so no outgoing connection squats here.
PORT_LO, PORT_HI = 20000, 32768
TARGETS_MS = {100: 20.0, 1024: 150.0}
RETRY_SECS = 0.0002
_LINGER_RST = struct.pack("ii", 1, 0)


# ---------------------------------------------------------------- port blocks


class Blocks:
    """Blocks of consecutive free ports for range rules.

    A port is taken only if a plain TCP bind succeeds and the abstract-socket lock
    the e2e tests use (``portunus-e2e-port-N``) can be held, so a concurrent test
    session never gets the same ports.  A block comes back with ``release`` once its
    rule is gone, and the search wraps around: a full run needs ~9,000 ports in
    1,024-port blocks, and on a busy machine 20000-32767 never has that many fresh.
    """

    def __init__(self, lo: int = PORT_LO, hi: int = PORT_HI) -> None:
        self.lo = lo
        self.next = lo
        self.hi = hi
        self.held: dict[int, list[socket.socket]] = {}

    def _take(self, port: int) -> socket.socket | None:
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lock.bind(f"\0portunus-e2e-port-{port}")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setsockopt(
                    socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
                )  # as the supervisor binds
                probe.bind((LOOPBACK, port))
        except OSError:
            lock.close()
            return None
        return lock

    def block(self, n: int) -> int:
        wrapped = False
        while True:
            if self.next + n > self.hi:
                if wrapped:
                    raise RuntimeError(f"no block of {n} free ports in {self.lo}-{self.hi - 1}")
                wrapped, self.next = True, self.lo
            start = self.next
            taken: list[socket.socket] = []
            for p in range(start, start + n):
                lock = (
                    None
                    if any(b <= p < b + len(v) for b, v in self.held.items())
                    else self._take(p)
                )
                if lock is None:
                    break
                taken.append(lock)
            if len(taken) == n:
                self.held[start] = taken
                self.next = start + n
                return start
            for lock in taken:
                lock.close()
            self.next = start + len(taken) + 1

    def release(self, start: int) -> None:
        """Give a block back (its rule was removed and its ports are free again)."""
        for lock in self.held.pop(start, []):
            lock.close()

    def close(self) -> None:
        for start in list(self.held):
            self.release(start)


# ------------------------------------------------------------------- server


@dataclass
class Control:
    socket_path: str
    token: str
    service: Service | None = None
    data_dir: str | None = None

    def call(self, method: str, params: dict[str, Any], timeout: float = 30.0) -> Any:
        return call_sync(self.socket_path, self.token, method, params, timeout)

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def server_bin() -> str:
    env = os.environ.get("PORTUNUS_SERVER_BIN")
    candidates = [
        env,
        shutil.which("portunus-server"),
        str(REPO / ".venv" / "bin" / "portunus-server"),
        str(Path(sys.executable).parent / "portunus-server"),
    ]
    for cand in candidates:
        if cand and os.access(cand, os.X_OK):
            return cand
    raise RuntimeError("portunus-server not found (set PORTUNUS_SERVER_BIN or pip install -e .)")


def start_server(log_dir: Path, shards: int | None) -> Control:
    data_dir = tempfile.mkdtemp(prefix="portunus-range-push-")
    token = "bench-" + os.urandom(16).hex()
    conf = {
        "operator_http_listen": f"{LOOPBACK}:{free_port()}",
        "metrics_listen": f"{LOOPBACK}:{free_port()}",
        "control_listen": f"{LOOPBACK}:{free_port()}",
        "listen_address": LOOPBACK,
        "log_format": "json",
        "log_level": "error",
        "shutdown_drain_timeout_secs": 1,
        "operator_token": token,
    }
    Path(data_dir, "server.toml").write_text(
        "".join(f"{k} = {json.dumps(v)}\n" for k, v in conf.items())
    )
    argv = [server_bin(), "--data-dir", data_dir, "serve"] + (
        ["--shards", str(shards)] if shards else []
    )
    ctl = Control(os.path.join(data_dir, "run", "control.sock"), token, data_dir=data_dir)

    def ready() -> bool:
        try:
            return bool(ctl.call("health", {}, timeout=1.0))
        except PortunusError:
            return False

    ctl.service = start_service("portunus-server", argv, log_dir, ready=ready, timeout=30.0)
    return ctl


# -------------------------------------------------------------- measurement


@dataclass
class Rep:
    reply_ms: float
    accepting_ms: float


class Prober(threading.Thread):
    """Connects to ports[0], ports[1], ... in order, each until it is accepted."""

    def __init__(self, first: int, n: int, deadline_secs: float = 30.0) -> None:
        super().__init__(daemon=True, name="range-prober")
        self.first, self.n = first, n
        self.deadline = time.perf_counter() + deadline_secs
        self.done_at: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        port, end = self.first, self.first + self.n
        while port < end:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            err = s.connect_ex((LOOPBACK, port))
            s.close()
            if err == 0:
                port += 1
                continue
            if time.perf_counter() > self.deadline:
                self.error = f"port {port} still refused ({os.strerror(err)})"
                return
            time.sleep(RETRY_SECS)
        self.done_at = time.perf_counter()


def push_once(ctl: Control, blocks: Blocks, n: int, target_first: int) -> Rep:
    first = blocks.block(n)
    params = {
        "client": "local",
        "protocol": "tcp",
        "listen_port_start": first,
        "listen_port_end": first + n - 1,
        "targets": [
            {"host": LOOPBACK, "port_start": target_first, "port_end": target_first + n - 1}
        ],
        "ack_timeout": 10,
    }
    prober = Prober(first, n)
    prober.start()
    t0 = time.perf_counter()
    rule = ctl.call("rules.push", params)
    t_reply = time.perf_counter()
    prober.join(35)
    try:
        if prober.error or prober.done_at is None:
            raise RuntimeError(f"{n}-port range at {first}: {prober.error or 'prober stuck'}")
        if rule.get("state") != "active":
            raise RuntimeError(f"rule not active: {rule}")
        return Rep((t_reply - t0) * 1000, (prober.done_at - t0) * 1000)
    finally:
        remove(ctl, rule["id"])
        blocks.release(first)


def remove(ctl: Control, rule_id: int) -> None:
    ctl.call("rules.remove", {"id": rule_id})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ctl.call("rules.get", {"id": rule_id})
        except PortunusError as exc:
            if exc.code == "rule_not_found":
                return
            raise
        time.sleep(0.02)
    raise RuntimeError(f"rule {rule_id} not deleted within 30 s")


@dataclass
class SizeResult:
    ports: int
    reps: list[Rep] = field(default_factory=list)

    def p50(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.reps)

    def summary(self) -> dict[str, Any]:
        acc = sorted(r.accepting_ms for r in self.reps)
        rep = sorted(r.reply_ms for r in self.reps)
        return {
            "ports": self.ports,
            "n": len(self.reps),
            "accepting_ms": {
                "p50": self.p50("accepting_ms"),
                "min": acc[0],
                "max": acc[-1],
                "p90": acc[min(len(acc) - 1, int(0.9 * len(acc)))],
                "samples": [round(x, 3) for x in (r.accepting_ms for r in self.reps)],
            },
            "reply_ms": {
                "p50": self.p50("reply_ms"),
                "min": rep[0],
                "max": rep[-1],
                "samples": [round(x, 3) for x in (r.reply_ms for r in self.reps)],
            },
            "target_ms": TARGETS_MS.get(self.ports),
        }


def measure(ctl: Control, sizes: list[tuple[int, int]], log: Any = print) -> list[SizeResult]:
    blocks = Blocks()
    try:
        target_first = blocks.block(max(n for n, _ in sizes))  # nothing listens there
        out: list[SizeResult] = []
        for n, reps in sizes:
            push_once(ctl, blocks, n, target_first)  # warm-up, not counted
            res = SizeResult(n)
            for i in range(reps):
                res.reps.append(push_once(ctl, blocks, n, target_first))
                log(
                    f"  {n} ports #{i + 1}: reply {res.reps[-1].reply_ms:.2f} ms, "
                    f"all accepting {res.reps[-1].accepting_ms:.2f} ms"
                )
            out.append(res)
        return out
    finally:
        blocks.close()


# ------------------------------------------------------------------ report


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPU ({cpu}), Python {sys.version.split()[0]}, {os.uname().release}"


def render(results: list[SizeResult], shards: str, date: str) -> str:
    lines = [
        "# Range-rule push latency",
        "",
        f"Run {date} on {machine()}; `portunus-server serve` with {shards} shard(s).",
        "",
        "Method: `rules.push` over the control socket (`call_sync`) of an N-port TCP range; a",
        "prober thread started just before the push connects to the ports in order (retrying",
        "a refused port every 0.2 ms). *push → all accepting* ends at the last port's",
        "successful connect; *push → reply* is the RPC round trip (the reply comes once the",
        "rule is `active`, i.e. bound). Fresh port block per repetition, rule removed and its",
        "deletion awaited in between, one unmeasured warm-up per size, server log level",
        "`error` (the probes' refused upstream connects would otherwise log warnings).",
        "",
        "| ports | reps | push → all accepting p50 | min – max | p90 | push → reply p50 | target (p50) | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary()
        acc, rep, target = s["accepting_ms"], s["reply_ms"], s["target_ms"]
        verdict = "–" if target is None else ("PASS" if acc["p50"] <= target else "FAIL")
        lines.append(
            f"| {r.ports} | {s['n']} | {acc['p50']:.2f} ms | {acc['min']:.2f} – {acc['max']:.2f} ms "
            f"| {acc['p90']:.2f} ms | {rep['p50']:.2f} ms | ≤ {target:.0f} ms | {verdict} |"
        )
    lines += ["", "Samples (ms, push → all accepting):", ""]
    for r in results:
        lines.append(f"- {r.ports} ports: " + ", ".join(f"{x.accepting_ms:.2f}" for x in r.reps))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------- entry points


def run(settings: Settings) -> list[BenchResult]:
    """For ``bench.run``: 20 × 100 ports and 5 × 1024 ports (quick: 5 and 2)."""
    reps100, reps1024 = (5, 2) if settings.quick else (20, 5)
    ctl = start_server(settings.log_dir, None)
    try:
        results = measure(ctl, [(100, reps100), (1024, reps1024)], log=lambda m: None)
    finally:
        ctl.close()
    out: list[BenchResult] = []
    for r in results:
        samples = [{"accepting_ms": x.accepting_ms, "reply_ms": x.reply_ms} for x in r.reps]
        out.append(
            BenchResult(
                name=f"range_push_{r.ports}",
                title=f"Range rule push → {r.ports} ports accepting",
                method="rules.push over the control socket; a prober connects to every port "
                "in order; fresh port block per repetition (see bench/range_push.py)",
                metrics=[
                    Metric("accepting_ms", "push → all accepting (ms)", False),
                    Metric("reply_ms", "push → RPC reply (ms)", False),
                ],
                per_forwarder={"portunus": samples},  # type: ignore[dict-item]
                extra={"target_ms": TARGETS_MS.get(r.ports)},
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.range_push",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--reps-100", type=int, default=20)
    p.add_argument("--reps-1024", type=int, default=5)
    p.add_argument("--shards", type=int, default=None, help="server shards (default: one per CPU)")
    p.add_argument("--socket", help="measure a running server's control socket instead")
    p.add_argument("--token-file", help="operator token for --socket")
    p.add_argument("--out", type=Path, default=HERE / "results" / "range_push.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw samples here")
    args = p.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="portunus-range-push-logs-"))
    if args.socket:
        token = (
            Path(args.token_file).read_text().strip()
            if args.token_file
            else os.environ.get("PORTUNUS_OPERATOR_TOKEN", "")
        )
        ctl = Control(args.socket, token)
        shards = "the running server's"
    else:
        ctl = start_server(log_dir, args.shards)
        shards = str(args.shards or os.cpu_count())
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        results = measure(
            ctl,
            [(100, args.reps_100), (1024, args.reps_1024)],
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    finally:
        ctl.close()
        shutil.rmtree(log_dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, shards, date))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "date": date,
                    "machine": machine(),
                    "shards": shards,
                    "sizes": [r.summary() for r in results],
                },
                indent=2,
            )
            + "\n"
        )
    print(args.out.read_text())
    failed = [
        r.ports
        for r in results
        if TARGETS_MS.get(r.ports) is not None and r.p50("accepting_ms") > TARGETS_MS[r.ports]
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
