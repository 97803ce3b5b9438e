"""What one counter snapshot (portunus/control/counters.py) costs the control process
with a big fleet.

    python -m bench.counter_snapshot [--clients 10000] [--rules-each 3] [--rounds 20]

Builds a store in a temp dir with ``--clients`` edge clients of ``--rules-each`` rules
each, a stand-in for RemoteLink (every client connected, one stats frame each), and
times ``RuleCounters.snapshot`` in-process: the first one (reads every rule), an idle
one (nothing moved), one after one client's counters moved, one after 500 clients
reconnected with a fresh stats frame (a slice of a restart storm) and one after a rule
was removed.  Wall time of the whole call, the store's thread included; the median
over ``--rounds``.  The snapshot runs every 2 s on control's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from portunus.control import counters  # noqa: E402
from portunus.control.store import Store  # noqa: E402
from portunus.control.store import rules as rules_db  # noqa: E402
from portunus.rules import Target, build_rule  # noqa: E402


class Remote:
    """RemoteLink's surface the snapshot reads."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, dict[str, Any]]] = {}
        self.runs: dict[str, str | None] = {}
        self.up: set[str] = set()

    def connected(self, client_id: str) -> bool:
        return client_id in self.up


async def _fill(store: Store, clients: int, each: int) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    async with store.write() as db:
        for c in range(clients):
            cid = f"c{c:05d}"
            await db.execute(
                "INSERT INTO clients (client_id, name, created_at) VALUES (?, ?, 'x')",
                (cid, f"edge-{c:05d}"),
            )
            ids[cid] = []
            for k in range(each):
                rule = build_rule(
                    id="0",
                    protocol="tcp",
                    listen=(10001 + k, 10001 + k),
                    targets=[Target("127.0.0.1", 9)],
                )
                ids[cid].append(await rules_db.insert_rule(db, cid, rule))
    return ids


def _frame(rule_ids: list[int], n: int) -> dict[str, dict[str, Any]]:
    return {
        str(r): {"bytes_in": n, "bytes_out": n, "connections_total": n, "active_connections": 0}
        for r in rule_ids
    }


async def _timed(rc: counters.RuleCounters, rounds: int, before: Any = None) -> float:
    took = []
    for i in range(rounds):
        if before is not None:
            before(i)
        t = time.perf_counter()
        await rc.snapshot()
        took.append((time.perf_counter() - t) * 1000)
    return statistics.median(took)


async def measure(args: argparse.Namespace) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="portunus-snapshot-bench-"))
    settings = SimpleNamespace(metrics_dir=str(tmp / "metrics"), runtime_dir=str(tmp / "run"))
    os.makedirs(settings.runtime_dir)
    store = await Store.open(str(tmp / "state.db"))
    try:
        ids = await _fill(store, args.clients, args.rules_each)
        remote = Remote()
        for cid, rules in ids.items():
            remote.up.add(cid)
            remote.stats[cid] = _frame(rules, 0)
        rc = counters.RuleCounters(store, settings, remote)
        out: dict[str, float] = {}
        t = time.perf_counter()
        await rc.snapshot()
        out["first (reads every rule)"] = (time.perf_counter() - t) * 1000
        out["idle (nothing moved)"] = await _timed(rc, args.rounds)
        clients = list(ids)

        def one_moved(i: int) -> None:
            cid = clients[i % len(clients)]
            remote.stats[cid] = _frame(ids[cid], i + 1)

        out["one client's counters moved"] = await _timed(rc, args.rounds, one_moved)

        def reconnected(i: int) -> None:
            for cid in clients[(i * 500) % len(clients) :][:500]:
                remote.stats[cid] = _frame(ids[cid], 0)

        out["500 clients sent a fresh stats frame"] = await _timed(rc, args.rounds, reconnected)
        gone = iter(r for rules in ids.values() for r in rules)

        async def remove_one() -> float:
            async with store.write() as db:
                await rules_db.delete_rule(db, next(gone))
            t = time.perf_counter()
            await rc.snapshot()
            return (time.perf_counter() - t) * 1000

        out["one rule removed"] = statistics.median(
            [await remove_one() for _ in range(args.rounds)]
        )
        return out
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.counter_snapshot", description=__doc__)
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--rules-each", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)
    res = asyncio.run(measure(args))
    print(
        f"counter snapshot, {args.clients} clients x {args.rules_each} rules, "
        f"median of {args.rounds} (load {os.getloadavg()[0]:.2f}):"
    )
    for what, ms in res.items():
        print(f"  {what}: {ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
