"""The Markdown and JSON of bench/edge_clients.py's results (kept apart so the
benchmark module stays about measuring)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.edge_clients import Results


def fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.2f} s"
    if unit in ("lines", "series"):
        return f"{v:.0f}"
    return f"{v:.1f} {unit}"


def _mem_line(label: str, m: dict[str, float]) -> str:
    return (
        f"| {label} | {m['control_rss_mib']:.1f} | {m['total_rss_mib']:.1f} | {int(m['processes'])} "
        f"| {int(m['control_fds'])} |"
    )


def render(res: Results, args: argparse.Namespace) -> str:
    m, f, n = res.machine, res.facts, res.clients
    empty, full = f["mem_empty"], f["mem_connected"]
    per_conn_kib = (full["control_rss_mib"] - empty["control_rss_mib"]) * 1024 / n
    lines = [
        f"## Edge clients (issues 6, 16): {n:,} fake clients, restart storm of {f['restart_clients']:,}",
        "",
        f"Run {res.date} on {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, Python {m['python']}, "
        f"Linux {m['kernel']}, commit {m['commit']}; "
        "`portunus-server serve --shards 1`, default log level; the fakes run in "
        f"{_procs(f)} (bench/edge_fleet.py, bench/fleet_group.py, uvloop). Load average {m['loadavg'][0]} at start, {m['loadavg_end'][0]} at the end "
        "(other jobs share the machine; the p99s follow the load).",
        "`python -m bench.edge_clients"
        + (" --quick" if args.quick else "")
        + f" --clients {n} --restart-clients {f['restart_clients']} --rules-each {f['restart_rules_each']}"
        + f" --restarts {len(res.series['restart'].values)}"
        + (" --legacy-link" if args.legacy_link else "")
        + (f" --per-source {args.per_source}" if args.per_source else "")
        + f" --fleet-procs {f.get('fleet_procs', 1)}"
        + "` (bench/edge_clients.py).",
        "",
        "| target | measured | target | |",
        "|---|---|---|---|",
    ]
    for what, unit, value, target, ok in res.verdicts():
        lines.append(
            f"| {what} | {fmt(value, unit)} | ≤ {fmt(target, unit)} | {'PASS' if ok else 'MISS'} |"
        )
    lines += ["", "| series | n | min | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|"]
    for key in (
        "list_rpc",
        "list_http",
        "ui_clients",
        "scrape",
        "get_rpc",
        "push",
        "restart",
        "restart_p99",
        "restart_listed",
        "restart_first",
        "restart_stop",
    ):
        s = res.series.get(key)
        if s is None or not s.values:
            continue
        d = s.summary()
        lines.append(
            f"| {s.name} | {d['n']} | "
            + " | ".join(fmt(d[k], s.unit) for k in ("min", "p50", "p90", "p99", "max"))
            + " |"
        )
    lines += [
        "",
        "| server memory | control RSS MiB | serve tree RSS MiB | processes | control fds |",
        "|---|---|---|---|---|",
        _mem_line("ready, no clients", empty),
        _mem_line(f"{n} clients connected (after one heartbeat + stats round)", full),
        _mem_line(
            f"… and {len(res.series['push'].values) + 5} pushed rules", f["mem_after_pushes"]
        ),
        "",
        f"Control-process growth per connected client: {per_conn_kib:.1f} KiB; fds per client: "
        f"{(full['control_fds'] - empty['control_fds']) / n:.2f} (control RLIMIT_NOFILE soft/hard: "
        f"{f['control_nofile'][0]}/{f['control_nofile'][1]}). Control-process CPU with {n} idle links "
        + (
            "(a `ping` + a `stats` frame per client every 5 s, server ping every 5 s)"
            if args.legacy_link
            else "(`quiet_link`: a `ping` each way every 20 s, `stats` only on change)"
        )
        + f": {f['control_idle_cpu_pct']:.1f} % of one core. Fleet processes' RSS: {f['fleet_rss_mib']:.0f} MiB. "
        f"Full walk of the list (`limit` 1000, {f['walk_pages']} pages): {f['walk_all_s'] * 1000:.0f} ms. "
        f"`busy` refusals: {f['busy_refusals']} while connecting the fleet, {f['restart_busy_refusals']} "
        "over the restarts (cumulative per fake)." + _storm_cpu(f),
        "",
        "Method:",
        f"- Enrollment of {n} clients: codes minted with `clients.enroll` over the control socket "
        f"(4 threads) in {f['mint_s']:.1f} s, redeemed with `portunus.edge.enroll.redeem` (pinned TLS, "
        f"32 concurrent) in {f['redeem_s']:.1f} s; then all {n} fakes connected at once and every one "
        f"had answered its first `sync` after {f['connect_all_s']:.1f} s.",
        f"- List: {len(res.series['list_rpc'].values)} sequential `clients.list` pages (default limit 100, "
        "a random cursor of a full walk each) via `call_sync` (new socket per call, like the CLI), as many "
        "`clients.get` of a random client by name, and as many `GET /v1/clients` on one keep-alive connection "
        "(every other one `?connected=true&name_prefix=fake-`), each after 5 warm-ups, while the fakes stay "
        f"connected ({f['list_bytes'] // 1024} KiB of JSON per page).",
        f"- Operator views: as many Web UI `GET /clients` pages (HTML, every other one "
        f"`?connected=true`; {f['ui_client_rows']} client rows on the last page) on one keep-alive "
        f"connection, and {len(res.series['scrape'].values)} `GET /metrics` scrapes of the metrics "
        f"listener ({f['scrape_bytes'] // 1024} KiB, {f['scrape_samples']} samples, "
        f"{f['scrape_connected_series']} `portunus_clients_connected` series).",
        f"- Push: {len(res.series['push'].values)} sequential `rules.push` (after 5 warm-ups) to a random "
        "connected fake, fresh listen port each; the reply comes after the fake's `applied` (`active`). "
        f"Fake reconnects during the whole phase: {f['reconnects_during_run']}.",
        f"- Restart: {f['restart_clients']} clients × {f['restart_rules_each']} rules; `serve` stopped with "
        f"SIGTERM and spawned {len(res.series['restart'].values)} times. The fakes reconnect with "
        "`portunus.edge.timing.Backoff` (0.5 s doubling, ±20 % jitter, like the real client), so the time is "
        "bounded below by the backoff step that first lands after the server is listening again. "
        '"Reconciled" = each fake got a full `sync` with all its rules from the new process and answered '
        "it; the p99 row is, per restart, the 99th percentile over the fakes of that time; the listed row "
        "also waits for `clients.list` + `rules.list` to show every client connected and every rule `active`.",
        f"- Server log lines with a traceback or asyncio 'Fatal error': {f['server_tracebacks']}"
        + (
            f" (first: `{(f['tracebacks_many'] + f['tracebacks_restart'])[0][:200]}`)"
            if f["server_tracebacks"]
            else ""
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def to_json(res: Results) -> dict[str, Any]:
    return {
        "date": res.date,
        "machine": res.machine,
        "clients": res.clients,
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


def _procs(facts: dict[str, Any]) -> str:
    n = int(facts.get("fleet_procs", 1))
    return "one other process" if n == 1 else f"{n} other processes"


def _storm_cpu(facts: dict[str, Any]) -> str:
    """Where the CPU went from spawn to the last fake re-synced, per restart: what the
    server would need on machines of its own, what the fake fleet took beside it."""
    rows = facts.get("restart_cpu") or []
    if not rows:
        return ""
    parts = [
        f"{r['wall_s']:.1f} s wall: control {r['control_s']:.1f} CPU-s, serve tree "
        f"{r['serve_tree_s']:.1f}, fake fleet {r['fleet_s']:.1f}, harness {r['harness_s']:.1f}"
        for r in rows
    ]
    out = " CPU from spawn to the last re-sync: " + "; ".join(parts) + "."
    for f in facts.get("restart_failures") or []:
        out += (
            f" Failed connect attempts in the storm: {f['attempts_failed']} by "
            f"{f['fakes_failed']} fakes (at most {f['max_per_fake']} for one; last errors "
            + ", ".join(f"{e!r} × {n}" for e, n in f["last_errors"])
            + f"); the gateway's pre-auth refusals: {f['preauth_refused'] or 'none'}."
        )
    return out
