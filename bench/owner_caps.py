"""Owner-cap accuracy: measured throughput ÷ cap at 1, 10 and 100 Mbit/s.

    python -m bench.owner_caps [--rounds 5] [--secs 6]

Starts its own ``portunus-server serve --shards 2`` (bench/range_push.py's
``start_server``) and an in-process sink that timestamps every read.  Two arms, in
the same run, interleaved round by round:

- ``portunus`` (the subject): two rules of owner ``bench`` on two ports, two
  connections to each (the kernel spreads them over both shards), under one owner
  cap ``bandwidth_in_bps`` = the rate; the rules have no caps of their own;
- ``portunus-rule``: one rule with its own ``bandwidth_in_bps`` = the rate, four
  connections, no owner cap: the rule-level cap, for comparison.

Each measurement sends as fast as the relay takes bytes for ``secs`` seconds, then
resets the connections.  Value = bytes the sink read between 1 s after the first
byte (past the bucket's initial burst, 64 KiB = 0.5 s at 1 Mbit/s) and the last
byte, over that span, ÷ the cap.  The contract asks for ±2 %.

For ``bench.run``: ``run(settings) -> list[BenchResult]``.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import LOOPBACK  # noqa: E402
from bench.range_push import Control, start_server  # noqa: E402
from bench.results import BenchResult, Metric, Settings  # noqa: E402
from bench.rounds import Sample  # noqa: E402

RATES_MBIT = (1, 10, 100)
SKIP_SECS = 1.0
CONNS = 4
_RST = struct.pack("ii", 1, 0)
_BUF = bytes(64 * 1024)


class Sink:
    """Accepts on a loopback port and records (time, bytes) of every read."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.points: list[tuple[float, int]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = bytearray(256 * 1024)
        with conn, contextlib.suppress(OSError):
            while n := conn.recv_into(buf):
                now = time.monotonic()
                with self.lock:
                    self.points.append((now, n))

    def take(self) -> list[tuple[float, int]]:
        with self.lock:
            pts, self.points = self.points, []
        return sorted(pts)

    def close(self) -> None:
        self.sock.close()


def steady_rate(points: list[tuple[float, int]], skip: float = SKIP_SECS) -> float:
    """Bytes per second after ``skip`` s from the first byte to the last."""
    if not points:
        return 0.0
    t0 = points[0][0]
    after = [(t, n) for t, n in points if t - t0 >= skip]
    if len(after) < 2:
        return 0.0
    span = after[-1][0] - after[0][0]
    return sum(n for _, n in after[1:]) / span if span > 0 else 0.0


def blast(ports: list[int], secs: float) -> None:
    """``CONNS`` connections round-robin over ``ports``, each sending for ``secs``."""
    socks = [
        socket.create_connection((LOOPBACK, ports[i % len(ports)]), timeout=10)
        for i in range(CONNS)
    ]
    deadline = time.monotonic() + secs

    def send(s: socket.socket) -> None:
        s.settimeout(0.5)
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                try:
                    s.send(_BUF)
                except TimeoutError:
                    continue

    threads = [threading.Thread(target=send, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(secs + 5)
    for s in socks:  # reset: what is still buffered must not reach the next measurement
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        s.close()


def push(
    ctl: Control, port: int, sink: Sink, owner: str, rate_limit: dict[str, int] | None
) -> None:
    body: dict[str, Any] = {
        "listen_port": port,
        "targets": [{"host": LOOPBACK, "port": sink.port}],
        "owner": owner,
    }
    if rate_limit:
        body["rate_limit"] = rate_limit
    ctl.call("rules.push", body)


def measure_all(
    ctl: Control, rounds: int, secs: float, rates: tuple[int, ...] = RATES_MBIT, log: Any = print
) -> dict[int, dict[str, list[Sample]]]:
    """Per rate (Mbit/s): samples of both arms ({"ratio", "error_pct", "mbit"})."""
    from bench.common import free_port

    sink = Sink()
    try:
        owner_ports = [free_port(), free_port()]
        rule_port = free_port()
        for user in ("bench", "solo"):  # rule owners are users with a grant for the ports
            ctl.call("users.add", {"user_id": user})
            ctl.call(
                "grants.add",
                {
                    "user_id": user,
                    "client": "local",
                    "listen_port_start": 1,
                    "listen_port_end": 65535,
                },
            )
        for p in owner_ports:
            push(ctl, p, sink, "bench", None)
        push(ctl, rule_port, sink, "solo", {"bandwidth_in_bps": 125_000})
        out: dict[int, dict[str, list[Sample]]] = {}
        for mbit in rates:
            cap = mbit * 1_000_000 // 8  # bytes per second
            ctl.call(
                "owner_caps.set",
                {"client": "local", "owner": "bench", "rate_limit": {"bandwidth_in_bps": cap}},
            )
            rule_id = next(r["id"] for r in ctl.call("rules.list", {"owner": "solo"})["rules"])
            ctl.call("rules.update", {"id": rule_id, "rate_limit": {"bandwidth_in_bps": cap}})
            arms = {"portunus": owner_ports, "portunus-rule": [rule_port]}
            got: dict[str, list[Sample]] = {name: [] for name in arms}
            for r in range(rounds):
                order = list(arms) if r % 2 == 0 else list(reversed(arms))
                for name in order:
                    time.sleep(0.3)  # the previous arm's reset connections are gone
                    sink.take()
                    blast(arms[name], secs)
                    rate = steady_rate(sink.take())
                    got[name].append(
                        {
                            "ratio": rate / cap,
                            "error_pct": (rate / cap - 1) * 100,
                            "mbit": rate * 8 / 1e6,
                        }
                    )
                    log(
                        f"owner_caps {mbit} Mbit/s {name}: {rate * 8 / 1e6:.3f} Mbit/s "
                        f"({(rate / cap - 1) * 100:+.2f} %)"
                    )
            out[mbit] = got
        return out
    finally:
        sink.close()


def results(measured: dict[int, dict[str, list[Sample]]], secs: float) -> list[BenchResult]:
    out = []
    for mbit, per_arm in measured.items():
        out.append(
            BenchResult(
                name=f"owner_caps_{mbit}mbit",
                title=f"Owner-cap accuracy at {mbit} Mbit/s (2 rules, 2 shards) vs a rule cap",
                method=f"{CONNS} connections send flat out for {secs:g} s; sink-side rate after the first "
                f"{SKIP_SECS:g} s ÷ the cap; `portunus` = owner cap over 2 rules, `portunus-rule` = "
                "one rule's own cap (see bench/owner_caps.py)",
                metrics=[
                    Metric("ratio", "measured ÷ cap", True, 4),
                    Metric("error_pct", "error (%)", False, 2),
                    Metric("mbit", "Mbit/s", True, 3),
                ],
                per_forwarder=dict(per_arm),  # type: ignore[arg-type]
                extra={"cap_mbit": mbit},
            )
        )
    return out


def run(settings: Settings) -> list[BenchResult]:
    rounds = 2 if settings.quick else settings.rounds
    secs = 3.0 if settings.quick else float(max(settings.duration, 3))
    ctl = start_server(settings.log_dir, 2)
    try:
        return results(measure_all(ctl, rounds, secs, log=lambda m: None), secs)
    finally:
        ctl.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.owner_caps", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--secs", type=float, default=6.0)
    args = p.parse_args(argv)
    import tempfile

    log_dir = Path(tempfile.mkdtemp(prefix="portunus-owner-caps-"))
    ctl = start_server(log_dir, 2)
    try:
        measured = measure_all(ctl, args.rounds, args.secs)
    finally:
        ctl.close()
    for mbit, arms in measured.items():
        for name, samples in arms.items():
            errs = sorted(s["error_pct"] for s in samples)
            print(
                f"{mbit:>4} Mbit/s {name:<14} median error {errs[len(errs) // 2]:+.2f} % "
                f"(min {errs[0]:+.2f}, max {errs[-1]:+.2f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
