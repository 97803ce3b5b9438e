"""Page latency of the paged lists with a large store (issue 16 "Listing").

    python -m bench.list_pages [--rules 10000] [--users 1000] [--clients 100] [--calls 200]
                               [--json bench/results/list_pages.json]

Starts ``portunus-server serve`` (temp data dir, loopback, one shard) with the e2e
fixture ``tests.e2e.support.ServerProc``, then seeds its state.db in one SQLite
transaction: ``--clients`` enrolled edge clients (never connected, so their rules are
not bound anywhere), ``--rules`` rules spread over them (owners among the users,
states mixed), ``--users`` users with two grants each.  Seeding writes rows directly
(pushing 10,000 rules would bind 10,000 ports or need 10,000 connected edges; the
lists only read rows).

Then, for each list, ``--calls`` sequential requests after 5 warm-ups, over the
control socket (``call_sync``: a connection per call, as the CLI) and over HTTP
(``GET /v1/...`` on one keep-alive connection): the first page, pages deep in the
list (cursors collected by walking it), and filtered pages.  Every answer is checked
(page size, ``total``).  Target: page p99 ≤ 50 ms.  Exit 1 if missed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import machine_info  # noqa: E402
from bench.control_plane import Series, running_server  # noqa: E402
from portunus.control.rpc.caller import call_sync  # noqa: E402
from portunus.control.store.accounts import new_ulid  # noqa: E402
from tests.e2e.support import LOOPBACK, PortAllocator, ServerProc  # noqa: E402

TARGET_P99_MS = 50.0
STATES = ("active", "active", "active", "pending", "failed")
NOW = "2026-01-01T00:00:00.000Z"


def log(msg: str) -> None:
    print(f"[list_pages] {msg}", file=sys.stderr, flush=True)


def seed(db_path: Path, n_rules: int, n_users: int, n_clients: int) -> list[str]:
    """Clients, users with grants, and rules, in one transaction; the client ids."""
    clients = [new_ulid() for _ in range(n_clients)]
    conn = sqlite3.connect(db_path, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO clients (client_id, name, created_at) VALUES (?, ?, ?)",
            [(c, f"edge-{i:04d}", NOW) for i, c in enumerate(clients)],
        )
        conn.executemany(
            "INSERT INTO users (name, role, created_at, display_name) VALUES (?, 'user', ?, ?)",
            [(f"user{i:04d}", NOW, f"User {i}") for i in range(n_users)],
        )
        ids = [r[0] for r in conn.execute("SELECT id FROM users WHERE name LIKE 'user%'")]
        conn.executemany(
            "INSERT INTO grants (user_id, client_id, port_start, port_end, protocols, created_at) "
            "VALUES (?, ?, 1024, 65535, 'tcp,udp', ?)",
            [(u, c, NOW) for u in ids for c in ("*", random.choice(clients))],
        )
        rows = []
        for i in range(n_rules):
            client = clients[i % n_clients]
            port = 1024 + i // n_clients
            owner = f"user{i % n_users:04d}"
            rows.append(
                (
                    client,
                    "udp" if i % 4 == 0 else "tcp",
                    port,
                    port,
                    owner,
                    STATES[i % len(STATES)],
                    NOW,
                )
            )
        conn.executemany(
            "INSERT INTO rules (client_id, protocol, listen_start, listen_end, owner, state, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute(
            "INSERT INTO rule_targets (rule_id, position, host, port, priority) "
            "SELECT id, 0, '127.0.0.1', 9, 1 FROM rules"
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return clients


def walk_cursors(srv: ServerProc, method: str, key: str, params: dict[str, Any]) -> list[str]:
    """Every next_cursor of a list walked at 100 rows a page (checks it is complete)."""
    cursors: list[str] = []
    got = call_sync(srv.socket_path, srv.token, method, params, 60)
    seen = len(got[key])
    while got["next_cursor"]:
        cursors.append(got["next_cursor"])
        got = call_sync(srv.socket_path, srv.token, method, {**params, "cursor": cursors[-1]}, 60)
        seen += len(got[key])
    if seen != got["total"]:
        raise RuntimeError(f"{method} walked {seen} rows, total says {got['total']}")
    return cursors


def measure(
    srv: ServerProc, cases: list[tuple[str, str, str, dict[str, Any], list[str], int]], calls: int
) -> list[Series]:
    """Each case over the control socket and over HTTP: a random cursor of ``cursors``
    (or none) per call; every answer has ``rows`` rows (the last page may have fewer)."""
    out: list[Series] = []
    conn = http.client.HTTPConnection(LOOPBACK, srv.api_port, timeout=30)
    headers = {"Authorization": f"Bearer {srv.token}"}
    try:
        for label, method, path, params, cursors, total in cases:
            key = method.split(".")[0]
            rpc = Series(f"{label} — control socket", "ms")
            web = Series(f"{label} — GET {path}", "ms")
            for i in range(calls + 5):
                cursor = random.choice(cursors) if cursors else None
                p = {**params, **({"cursor": cursor} if cursor else {})}
                t0 = time.perf_counter()
                got = call_sync(srv.socket_path, srv.token, method, p, 30)
                took = (time.perf_counter() - t0) * 1000
                _check(got, key, total, label)
                if i >= 5:
                    rpc.values.append(took)
                query = urlencode({("user" if k == "user_id" else k): v for k, v in p.items()})
                t0 = time.perf_counter()
                conn.request("GET", f"{path}?{query}", headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                took = (time.perf_counter() - t0) * 1000
                if resp.status != 200:
                    raise RuntimeError(f"GET {path}?{query}: {resp.status} {body[:200]!r}")
                _check(json.loads(body), key, total, label)
                if i >= 5:
                    web.values.append(took)
            out += [rpc, web]
    finally:
        conn.close()
    return out


def _check(got: dict[str, Any], key: str, total: int, label: str) -> None:
    if got["total"] != total or not got[key]:
        raise RuntimeError(f"{label}: {len(got[key])} rows, total {got['total']} != {total}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=1_000)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    random.seed(16)
    tmp = Path(tempfile.mkdtemp(prefix="portunus-bench-pages-"))
    with closing(PortAllocator()) as ports, running_server(tmp, ports, shards=1) as srv:
        log(f"seeding {args.rules} rules, {args.users} users, {args.clients} clients")
        clients = seed(srv.db_path, args.rules, args.users, args.clients)
        n, u = args.rules, args.users
        owner = "user0007"
        by_owner = sum(1 for i in range(n) if i % u == 7)
        failed = sum(1 for i in range(n) if STATES[i % len(STATES)] == "failed")
        one, other = 3 % args.clients, 4 % args.clients  # two clients by position
        by_client = sum(1 for i in range(n) if i % args.clients == one)
        users_total = u + 1  # + the built-in operator
        rule_cursors = walk_cursors(srv, "rules.list", "rules", {})
        user_cursors = walk_cursors(srv, "users.list", "users", {})
        grant_cursors = walk_cursors(srv, "grants.list", "grants", {})
        failed_cursors = walk_cursors(srv, "rules.list", "rules", {"state": "failed"})
        cases = [
            ("rules, first page (100)", "rules.list", "/v1/rules", {}, [], n),
            (
                f"rules, a random page of {len(rule_cursors) + 1}",
                "rules.list",
                "/v1/rules",
                {},
                rule_cursors,
                n,
            ),
            (
                "rules, state=failed, a random page",
                "rules.list",
                "/v1/rules",
                {"state": "failed"},
                failed_cursors,
                failed,
            ),
            ("rules, owner=", "rules.list", "/v1/rules", {"owner": owner}, [], by_owner),
            (
                "rules, client= (name)",
                "rules.list",
                "/v1/rules",
                {"client": f"edge-{one:04d}"},
                [],
                by_client,
            ),
            (
                "rules, client=+protocol=udp",
                "rules.list",
                "/v1/rules",
                {"client": clients[other], "protocol": "udp"},
                [],
                sum(1 for i in range(n) if i % args.clients == other and i % 4 == 0),
            ),
            (
                f"users, a random page of {len(user_cursors) + 1}",
                "users.list",
                "/v1/users",
                {},
                user_cursors,
                users_total,
            ),
            (
                "users, name_prefix=user00",
                "users.list",
                "/v1/users",
                {"name_prefix": "user00"},
                [],
                min(u, 100),
            ),
            (
                f"grants, a random page of {len(grant_cursors) + 1}",
                "grants.list",
                "/v1/grants",
                {},
                grant_cursors,
                2 * u,
            ),
            ("grants, user=", "grants.list", "/v1/grants", {"user_id": owner}, [], 2),
        ]
        log(f"{len(cases)} cases x {args.calls} calls, control socket and HTTP")
        series = measure(srv, cases, args.calls)
    shutil.rmtree(tmp, ignore_errors=True)
    load = [round(x, 2) for x in os.getloadavg()]
    ok = all(s.summary()["p99"] <= TARGET_P99_MS for s in series)
    print(f"| list ({n:,} rules, {u:,} users) | n | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for s in series:
        m = s.summary()
        print(f"| {s.name} | {m['n']} | {m['p50']:.1f} | {m['p99']:.1f} | {m['max']:.1f} |")
    print(f"\ntarget page p99 ≤ {TARGET_P99_MS:g} ms: {'met' if ok else 'MISSED'}")
    print(f"load average (1/5/15 min) at the end: {load}: other work on the machine adds noise")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "bench": "bench/list_pages.py",
                    "rules": n,
                    "users": u,
                    "clients": args.clients,
                    "machine": machine_info(),
                    "target_p99_ms": TARGET_P99_MS,
                    "load_average_at_end": load,
                    "series": [s.summary() for s in series],
                },
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
