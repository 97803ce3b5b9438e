"""Web UI pages with 1,000 rules and 100 clients: server time and first paint.

A data dir is seeded offline (100 enrolled clients, 1,000 rules spread over them and
the local node, a day of minute traffic history for 100 of the rules), then
``portunus-server serve`` runs on it.  Measured:

- server time: sequential GETs of ``/`` and ``/rules`` over one keep-alive loopback
  connection (time from sending the request to the last byte of the page);
- first paint: headless Chromium (the system's, via Playwright) opening each page in
  a fresh tab, ``first-contentful-paint`` from the Paint Timing API.

``python -m bench.webui [--quick]`` writes its section into bench/RESULTS.md
(between ``<!-- webui -->`` markers; other sections are left alone).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import LOOPBACK, REPO, free_port, http_ok, machine_info, services, start_service

RULES, CLIENTS, BUSY_RULES = 1000, 100, 100
SERVER_P99_MS, PAINT_MS = 50.0, 500.0
PAGES = ("/", "/rules")
FLOOR = "/v1/health"  # one trivial RPC: what the machine's load alone costs a request
MARK_START, MARK_END = "<!-- webui -->", "<!-- /webui -->"


async def seed(data_dir: Path) -> None:
    """Clients, rules and traffic written straight into state.db (serve not running)."""
    from portunus.control.store import Store
    from portunus.control.store import traffic as db_traffic
    from portunus.control.store.rules import insert_rule, set_state
    from portunus.rules import Rule, Target

    store = await Store.open(str(data_dir / "state.db"))
    rng = random.Random(7)
    try:
        async with store.write() as db:
            ids = [f"01BENCHCLIENT{i:05d}" for i in range(CLIENTS)]
            await db.executemany(
                "INSERT INTO clients (client_id, name, created_at) VALUES (?, ?, ?)",
                [(cid, f"edge-{i:03d}", "2026-01-01T00:00:00.000Z") for i, cid in enumerate(ids)],
            )
            rule_ids = []
            for n in range(RULES):
                client = ids[n % CLIENTS]
                rule = Rule(
                    id="0",
                    protocol="tcp" if n % 5 else "udp",
                    listen_start=40000 + n,
                    listen_end=40000 + n,
                    targets=(Target(f"10.0.{n // 250}.{n % 250 + 1}", 8000 + n % 100, 1),),
                )
                rid = await insert_rule(db, client, rule)
                await set_state(db, rid, rng.choice(["active"] * 8 + ["pending", "failed"]), None)
                rule_ids.append((rid, client))
            now = time.time()
            for rid, client in rule_ids[:BUSY_RULES]:
                deltas_at = [
                    (
                        now - m * 60,
                        db_traffic.Delta(
                            rid,
                            client,
                            "",
                            rng.randint(10**5, 10**7),
                            rng.randint(10**5, 10**7),
                            rng.randint(1, 50),
                        ),
                    )
                    for m in range(0, 1440, 1)
                ]
                for ts, d in deltas_at:
                    await db_traffic.add_deltas(db, ts, [d])
    finally:
        await store.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def server_times(port: int, token: str, path: str, n: int) -> list[float]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    out: list[float] = []
    try:
        for i in range(n + 5):
            t0 = time.perf_counter()
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            body = resp.read()
            took = (time.perf_counter() - t0) * 1000
            assert resp.status == 200 and (len(body) > 1000 or path == FLOOR), (path, resp.status)
            if i >= 5:  # warm-up
                out.append(took)
    finally:
        conn.close()
    return out


def first_paints(base: str, token: str, path: str, n: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("bench.webui: chromium is not installed (apt-get install chromium)")
    out: list[float] = []
    misses = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        while len(out) < n + 2:
            # A fresh context (so a foreground tab, cold cache) per load: background tabs
            # get no paint timing.
            ctx = browser.new_context(
                viewport={"width": 1280, "height": 800},
                extra_http_headers={"Authorization": f"Bearer {token}"},
            )
            page = ctx.new_page()
            page.goto(base + path, wait_until="load")
            page.wait_for_timeout(50)  # headless Chromium may report the paint entry a frame late
            fcp = page.evaluate(
                "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime"
            )
            ctx.close()
            if fcp is None:
                misses += 1
                if misses > 3 * n:
                    raise SystemExit(f"bench.webui: no first-contentful-paint entries for {path}")
                continue
            out.append(float(fcp))
        browser.close()
    del out[:2]  # warm-up
    return out


def render(results: dict[str, Any], machine: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        MARK_START,
        f"## Web UI pages with {RULES:,} rules and {CLIENTS} clients (issue 12)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine['nproc']} CPUs "
        f"({machine['cpu_model']}), Python {machine['python']}, commit {machine['commit']}; "
        f"`portunus-server serve --shards 1`; load average {results['load'][0]:.2f} at start, "
        f"{results['load_end'][0]:.2f} at the end (other jobs share the machine). "
        f"Seeded offline: {CLIENTS} enrolled clients, {RULES:,} rules over them, a day of minute history for "
        f"{BUSY_RULES} rules. `python -m bench.webui"
        + (" --quick" if args.quick else "")
        + "` (bench/webui.py).",
        "",
        "Server time: sequential GETs over one keep-alive loopback connection, request sent → last byte. "
        "First paint: system Chromium, headless, a fresh tab per load, `first-contentful-paint`.",
        "",
        "| page | server p50 | server p99 (≤ 50 ms) | | first paint p50 (≤ 500 ms) | p90 | max | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in PAGES:
        r = results[path]
        server_ok, paint_ok = r["p99"] <= SERVER_P99_MS, r["paint_p50"] <= PAINT_MS
        lines.append(
            f"| `{path}` | {r['p50']:.1f} ms | {r['p99']:.1f} ms | {'PASS' if server_ok else 'MISS'} | "
            f"{r['paint_p50']:.0f} ms | {r['paint_p90']:.0f} ms | {r['paint_max']:.0f} ms | "
            f"{'PASS' if paint_ok else 'MISS'} |"
        )
    floor = results[FLOOR]
    lines.append(
        f"| `{FLOOR}` (reference: one trivial RPC, no page) | {floor['p50']:.1f} ms | "
        f"{floor['p99']:.1f} ms | | | | | |"
    )
    lines += [
        "",
        f"({results['n']} server samples and {results['paints']} page loads per page.) "
        "What the pages cost: the dashboard issues 7 control RPCs (who is asking, rule counts by state, "
        "the failed rules, clients, the traffic summary with its top rules, the hour and day series), the "
        "rules page 4 (one page of 50 rules read by cursor, clients, rates); each takes 0.3-2.5 ms "
        "in control with this data set, the rest is the web process (JSON, Jinja2). The p99 tail follows "
        "the machine's load more than the code: a page needs ~10 ms of CPU across three processes, and on "
        "a busy 2-CPU machine a few percent of requests are preempted (an earlier run at load average ~10 "
        "measured a dashboard p99 of 57 ms); the one-hop `/v1/health` row shows the machine's own tail, "
        "and the load average is in the heading.",
        MARK_END,
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = REPO / "bench" / "RESULTS.md") -> None:
    doc = path.read_text() if path.exists() else "# Portunus benchmarks\n"
    if MARK_START in doc and MARK_END in doc:
        head, rest = doc.split(MARK_START, 1)
        doc = head + text + rest.split(MARK_END, 1)[1]
    else:
        anchor = "\n## Targets"
        doc = (
            doc.replace(anchor, "\n" + text + "\n" + anchor, 1)
            if anchor in doc
            else doc + "\n" + text + "\n"
        )
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args()
    n, paints = (60, 8) if args.quick else (300, 25)
    work = Path(tempfile.mkdtemp(prefix="ptn-webui-", dir="/tmp"))
    data = work / "data"
    data.mkdir()
    api, metrics, gateway = free_port(), free_port(), free_port()
    (data / "server.toml").write_text(
        f'operator_http_listen = "{LOOPBACK}:{api}"\nmetrics_listen = "{LOOPBACK}:{metrics}"\n'
        f'control_listen = "{LOOPBACK}:{gateway}"\nlisten_address = "{LOOPBACK}"\nlog_level = "warning"\n'
    )
    asyncio.run(seed(data))
    results: dict[str, Any] = {"load": os.getloadavg(), "n": n, "paints": paints}
    server_bin = str(REPO / ".venv" / "bin" / "portunus-server")
    with services() as started:
        started.append(
            start_service(
                "serve-webui",
                [server_bin, "--data-dir", str(data), "serve", "--shards", "1"],
                work,
                ready=lambda: http_ok(f"http://{LOOPBACK}:{api}/v1/health"),
                timeout=60,
                env={"PORTUNUS_RUNTIME_DIR": str(work / "run")},
            )
        )
        token = (data / "operator.token").read_text().strip()
        floor = server_times(api, token, FLOOR, n)
        results[FLOOR] = {"p50": statistics.median(floor), "p99": percentile(floor, 0.99)}
        for path in PAGES:
            times = server_times(api, token, path, n)
            fcp = first_paints(f"http://{LOOPBACK}:{api}", token, path, paints)
            results[path] = {
                "p50": statistics.median(times),
                "p99": percentile(times, 0.99),
                "paint_p50": statistics.median(fcp),
                "paint_p90": percentile(fcp, 0.9),
                "paint_max": max(fcp),
            }
    results["load_end"] = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)
    text = render(results, machine_info(), args)
    print(text)
    print(json.dumps(results, default=str))
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
