"""Push → active with many users and grants vs without (issue 11 target).

    python -m bench.rbac_push [--pushes 300] [--users 1000] [--grants 10] [--shards N]
                              [--out bench/results/rbac_push.md]

A variant of ``bench.control_plane``'s RPC push: two servers run side by side,
``empty`` (one user, ``bench``, with one grant) and ``crowded`` (the same user
plus ``--users`` others, every user with ``--grants`` grants; ``bench``'s
covering grant is its last).  Users, grants and ``bench``'s API token are written
into state.db before ``serve`` starts (hashing 1,000 Argon2id passwords through
the API would take minutes and measure nothing of the push path).  Pushes by
``bench`` (a ``user``: authorization, owner and grant check on every push) then
alternate between the two servers, so machine drift hits both alike; each push
is a fresh port, timed from the request until the reply that says ``active``,
and the port must accept right after.  5 unmeasured warm-ups per server.

Target: crowded p99 ÷ empty p99 ≤ 1.2.  Exit status 1 when it is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.control_plane import Series, accepts, log, machine, pct, push_params  # noqa: E402
from portunus.control.auth import hash_token  # noqa: E402
from portunus.control.rpc.caller import call_sync  # noqa: E402
from portunus.control.store.migrations import connect_sync, migrate, utc_now  # noqa: E402
from tests.e2e.support import Origin, PortAllocator, ServerProc, echo  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 1.2
TOKEN = "bench-user-token-0123456789abcdefghijklmnopqrstuvwxyz"


def populate(db_path: Path, users: int, grants: int, lo: int, hi: int) -> None:
    """``bench`` (grants-1 decoys + one grant over lo..hi) and ``users`` others."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect_sync(str(db_path))
    try:
        migrate(conn, str(db_path))
        now = utc_now()
        conn.execute("BEGIN")
        names = ["bench"] + [f"user{i:04d}" for i in range(users)]
        for n, name in enumerate(names):
            uid = conn.execute(
                "INSERT INTO users (name, role, created_at, display_name) VALUES (?, 'user', ?, ?)",
                (name, now, name),
            ).lastrowid
            rows = [
                (uid, "local", 1000 + 10 * g, 1005 + 10 * g, "tcp", None, now)
                for g in range(grants - 1)
            ]
            if name == "bench":
                rows.append((uid, "local", lo, hi, "tcp", None, now))
                conn.execute(
                    "INSERT INTO tokens (user_id, token_hash, name, created_at) VALUES (?, ?, 'bench', ?)",
                    (uid, hash_token(TOKEN), now),
                )
            else:
                rows.append((uid, "*", 40000 + n, 40000 + n, "tcp,udp", "decoy", now))
            conn.executemany(
                "INSERT INTO grants (user_id, client_id, port_start, port_end, protocols, note, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def start(workdir: Path, ports: PortAllocator, shards: int, users: int, grants: int) -> ServerProc:
    srv = ServerProc(
        workdir=workdir,
        data_dir=workdir / "data",
        ports=ports,
        shards=shards,
        name=workdir.name,
        settings={"shutdown_drain_timeout_secs": 1},
    )
    populate(srv.db_path, users, grants, 20000, 32000)
    srv.start()
    srv.wait_ready(timeout=60)
    return srv


def push(srv: ServerProc, port: int, origin: Origin) -> float:
    t0 = time.perf_counter()
    rule = call_sync(srv.socket_path, TOKEN, "rules.push", push_params(port, origin.port), 10.0)
    took = (time.perf_counter() - t0) * 1000
    if rule.get("state") != "active" or rule.get("owner") != "bench":
        raise RuntimeError(f"push answered {rule}")
    return took


def measure(args: argparse.Namespace) -> dict[str, Any]:
    ports = PortAllocator()
    origin = Origin(echo)
    root = Path(tempfile.mkdtemp(prefix="ptn-bench-rbac-"))
    servers: dict[str, ServerProc] = {}
    try:
        log(
            f"starting empty (1 user x {args.grants} grants) and crowded ({args.users + 1} users x "
            f"{args.grants} grants) servers"
        )
        servers["empty"] = start(root / "empty", ports, args.shards, 0, args.grants)
        servers["crowded"] = start(root / "crowded", ports, args.shards, args.users, args.grants)
        series = {k: Series(f"push → active, user with grants, {k}", "ms") for k in servers}
        not_accepting = dict.fromkeys(servers, 0)
        for srv in servers.values():
            for _ in range(5):
                push(srv, ports.port(), origin)
        for i in range(args.pushes):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for key in order:
                port = ports.port()
                series[key].values.append(push(servers[key], port, origin))
                if not accepts(port):
                    not_accepting[key] += 1
        return {
            "machine": machine(),
            # Output paths are the caller's files, not facts of the run.
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "json")},
            "series": {k: s.summary() for k, s in series.items()},
            "not_accepting": not_accepting,
            "ratio_p99": pct(series["crowded"].values, 99) / pct(series["empty"].values, 99),
            "ratio_p50": pct(series["crowded"].values, 50) / pct(series["empty"].values, 50),
        }
    finally:
        for srv in servers.values():
            srv.cleanup()
        origin.close()
        ports.close()


def render(res: dict[str, Any]) -> str:
    s = res["series"]
    rows = "\n".join(
        f"| {k} | {v['n']} | {v['p50']:.2f} | {v['p90']:.2f} | {v['p99']:.2f} | {v['max']:.2f} |"
        for k, v in s.items()
    )
    ok = res["ratio_p99"] <= TARGET_RATIO
    a = res["args"]
    return (
        f"## Push → active with {a['users']:,} users × {a['grants']} grants (`bench.rbac_push`)\n\n"
        f"Two servers side by side, pushes by a `user` alternating between them (same run): `empty` has "
        f"only that user, `crowded` {a['users']:,} more users, every user {a['grants']} grants "
        f"({(a['users'] + 1) * a['grants']:,} grants). Sequential `rules.push` over the control socket, "
        f"fresh port each, reply = rule `active`.\n\n"
        f"| server | n | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n{rows}\n\n"
        f"crowded ÷ empty: p50 {res['ratio_p50']:.2f}×, p99 {res['ratio_p99']:.2f}× (target ≤ "
        f"{TARGET_RATIO}×: {'met' if ok else 'MISSED'}); ports not accepting right after the reply: "
        f"{res['not_accepting']}. Machine: {res['machine']}.\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.rbac_push", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--pushes", type=int, default=300)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--grants", type=int, default=10)
    p.add_argument("--shards", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "rbac_push.md")
    p.add_argument("--json", type=Path, default=HERE / "results" / "rbac_push.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = measure(args)
    text = render(res)
    args.out.write_text(text)
    res["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in res["args"].items()}
    args.json.write_text(json.dumps(res, indent=2))
    print(text)
    return 0 if res["ratio_p99"] <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
