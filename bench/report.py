"""RESULTS.md from the run's JSON: machine, method, one table per benchmark, targets.

Works from the same dict that goes to bench/results/latest.json, so the Markdown can
be regenerated from a saved run: ``python -m bench.report bench/results/latest.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.forwarders import FORWARDERS

ANALYSIS = Path(__file__).resolve().parent / "ANALYSIS.md"
SOAK = Path(__file__).resolve().parent / "results" / "soak.md"
IDLE_TARGET_BYTES = 60e6  # "≤ 60 MB for 10k connections", decimal MB (the stricter)
IDLE_TARGET_CONNS = 10_000
FAILOVER_TARGET_PCT = 99.0


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def short_reason(reason: str, limit: int = 160) -> str:
    first = " ".join(reason.split())
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _order(results: dict[str, Any]) -> list[str]:
    known = [f for f in FORWARDERS if f in results]
    return known + [f for f in results if f not in known]


def table(bench: dict[str, Any]) -> list[str]:
    metrics = bench["metrics"]
    head = metrics[0]
    results = bench["results"]
    cols = [f"{head['label']} (median)", "min – max", "IQR"]
    cols += [m["label"] for m in metrics[1:]]
    cols.append(f"portunus ÷ this ({head['label']})")
    lines = ["| contender | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for fwd in _order(results):
        entry = results[fwd]
        if "error" in entry:
            cells = [f"n/a — {short_reason(entry['error'])}"] + [""] * (len(cols) - 1)
            lines.append(f"| {fwd} | " + " | ".join(cells) + " |")
            continue
        h = entry.get(head["key"])
        d = head["digits"]
        cells = [
            fmt(h["median"], d) if h else "–",
            f"{fmt(h['min'], d)} – {fmt(h['max'], d)}" if h else "–",
            f"{fmt(h['q1'], d)} – {fmt(h['q3'], d)}" if h and "q1" in h else "–",
        ]
        for m in metrics[1:]:
            s = entry.get(m["key"])
            cells.append(fmt(s["median"], m["digits"]) if s else "–")
        ratio = bench["ratios"].get(f"portunus/{fwd}")
        cells.append("" if fwd == "portunus" else (f"{ratio:.2f}×" if ratio else "–"))
        lines.append(f"| {fwd} | " + " | ".join(cells) + " |")
    return lines


def _median(benches: dict[str, Any], name: str, fwd: str, key: str) -> float | None:
    entry = benches.get(name, {}).get("results", {}).get(fwd)
    if not entry or "error" in entry or key not in entry:
        return None
    return float(entry[key]["median"])


def targets(benches: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and PASS / FAIL / n/a (and why)."""
    out: list[dict[str, Any]] = []

    def ratio_target(label: str, name: str, key: str, other: str, op: str, bound: float) -> None:
        mine = _median(benches, name, "portunus", key)
        theirs = _median(benches, name, other, key)
        if name not in benches:
            out.append({"target": label, "value": None, "status": "n/a", "why": "not run"})
        elif mine is None or theirs is None:
            missing = "portunus" if mine is None else other
            out.append(
                {
                    "target": label,
                    "value": None,
                    "status": "n/a",
                    "why": f"no {missing} measurement",
                }
            )
        elif theirs <= 0:
            out.append(
                {
                    "target": label,
                    "value": None,
                    "status": "n/a",
                    "why": f"{other} value {theirs:.2f} is not positive",
                }
            )
        else:
            r = mine / theirs
            ok = r >= bound if op == ">=" else r <= bound
            out.append({"target": label, "value": f"{r:.2f}×", "status": "PASS" if ok else "FAIL"})

    def not_run(group: str) -> str:
        """Why a benchmark that reports under ``group_*`` names has no result."""
        err = benches.get(group, {}).get("error")
        return f"failed: {short_reason(err, 120)}" if err else "not run"

    def ms_target(label: str, name: str, key: str, bound: float) -> None:
        value = _median(benches, name, "portunus", key)
        if name not in benches or value is None:
            why = not_run("range_push") if name not in benches else "no portunus measurement"
            out.append({"target": label, "value": None, "status": "n/a", "why": why})
        else:
            ok = value <= bound
            out.append(
                {"target": label, "value": f"{value:.1f} ms", "status": "PASS" if ok else "FAIL"}
            )

    ratio_target(
        "single-flow TCP throughput ≥ 0.85× direct",
        "tcp_throughput_1",
        "gbps",
        "direct",
        ">=",
        0.85,
    )
    ratio_target(
        "single-flow TCP throughput ≥ 1.2× HAProxy",
        "tcp_throughput_1",
        "gbps",
        "haproxy",
        ">=",
        1.2,
    )
    ratio_target("short-connection rate ≥ 1.0× nginx", "short_conn", "rps", "nginx", ">=", 1.0)
    ratio_target(
        "UDP ping-pong round trips/s ≥ 1.0× nginx", "udp_pingpong", "rate", "nginx", ">=", 1.0
    )
    ratio_target(
        "UDP blast delivered ≥ 1.2× nginx", "udp_blast", "delivered_pps", "nginx", ">=", 1.2
    )
    ratio_target(
        "added p50 latency ≤ 1.3× nginx's added p50", "latency", "added_p50_us", "nginx", "<=", 1.3
    )

    for ports, bound in ((100, 20.0), (1024, 150.0)):
        ms_target(
            f"{ports}-port range push → all accepting p50 ≤ {bound:.0f} ms",
            f"range_push_{ports}",
            "accepting_ms",
            bound,
        )
    # control_plane.run puts every issue-4 verdict, computed by bench/control_plane.py
    # itself, on each of its results; read them from the first one present.
    cp = next((b for n, b in benches.items() if n.startswith("control_plane_")), None)
    if cp is None:
        out.append(
            {
                "target": "control-plane targets (issue 4)",
                "value": None,
                "status": "n/a",
                "why": not_run("control_plane"),
            }
        )
    else:
        for t in cp.get("targets", []):
            unit = t["unit"]
            shown = f"{t['value']:.2f} {unit}" if unit == "s" else f"{t['value']:.1f} {unit}"
            out.append(
                {
                    "target": f"{t['what']} ≤ {t['target']:g} {unit}",
                    "value": shown,
                    "status": "PASS" if t["pass"] else "FAIL",
                }
            )

    label = "idle RSS growth ≤ 60 MB for 10k connections"
    idle = _median(benches, "idle_memory", "portunus", "idle_10k_mib")
    if "idle_memory" not in benches or idle is None:
        why = "not run" if "idle_memory" not in benches else "no portunus measurement"
        out.append({"target": label, "value": None, "status": "n/a", "why": why})
    else:
        grown = idle * 2**20
        entry = {
            "target": label,
            "value": f"{grown / 1e6:.1f} MB ({idle:.1f} MiB)",
            "status": "PASS" if grown <= IDLE_TARGET_BYTES else "FAIL",
        }
        conns = benches["idle_memory"].get("connections", IDLE_TARGET_CONNS)
        if conns != IDLE_TARGET_CONNS:
            entry["why"] = f"scaled from {conns:,} measured connections"
        out.append(entry)

    def summary_target(
        label: str, name: str, stat: str, bound: float, unit: str, clients: int
    ) -> None:
        """A target on one statistic of a series-style result (bench/edge_clients.py)."""
        bench = benches.get(name, {})
        value = bench.get("summary", {}).get(stat)
        if value is None:
            why = "not run" if name not in benches else "no measurement"
            out.append({"target": label, "value": None, "status": "n/a", "why": why})
            return
        shown = f"{value:.2f} s" if unit == "s" else f"{value:.1f} ms"
        entry = {"target": label, "value": shown, "status": "PASS" if value <= bound else "FAIL"}
        if bench.get("clients", clients) != clients:
            entry["why"] = f"measured with {bench['clients']:,} clients"
        out.append(entry)

    for name, what in (
        ("list_rpc", "`clients.list`"),
        ("list_http", "`GET /v1/clients`"),
        ("push", "push → acked"),
    ):
        summary_target(
            f"1,000 edge clients: {what} p99 ≤ 100 ms",
            f"edge_clients_{name}",
            "p99",
            100.0,
            "ms",
            1000,
        )
    summary_target(
        "server restart → 100 edge clients reconnected and reconciled ≤ 10 s (median)",
        "edge_clients_restart",
        "p50",
        10.0,
        "s",
        100,
    )

    for flow, what in (("tls", "real TLS"), ("raw", "ClientHello + raw")):
        ratio_target(
            f"SNI-routed single-flow throughput ≥ 0.9× the same rule without SNI ({what})",
            f"sni_{flow}",
            "gbps",
            "portunus-plain",
            ">=",
            0.9,
        )

    for mbit in (1, 10, 100):
        name = f"owner_caps_{mbit}mbit"
        label = f"owner cap at {mbit} Mbit/s: 2 rules on 2 shards within ±2 % of the cap"
        err = _median(benches, name, "portunus", "error_pct")
        if err is None:
            why = not_run("owner_caps") if name not in benches else "no portunus measurement"
            out.append({"target": label, "value": None, "status": "n/a", "why": why})
            continue
        rule_err = _median(benches, name, "portunus-rule", "error_pct")
        shown = f"{err:+.2f} %" + (
            f" (rule cap: {rule_err:+.2f} %)" if rule_err is not None else ""
        )
        out.append(
            {"target": label, "value": shown, "status": "PASS" if abs(err) <= 2.0 else "FAIL"}
        )

    label = "failover: ≥ 99 % of new connections succeed in the 1st s after the primary dies"
    fo = benches.get("failover", {}).get("results", {}).get("portunus", {})
    if "failover" not in benches or "ok_first_s_pct" not in fo:
        why = "not run" if "failover" not in benches else "no portunus measurement"
        out.append({"target": label, "value": None, "status": "n/a", "why": why})
    else:
        s = fo["ok_first_s_pct"]
        out.append(
            {
                "target": label,
                "value": f"{s['median']:.2f} % (median; worst round {s['min']:.2f} %)",
                "status": "PASS" if s["median"] >= FAILOVER_TARGET_PCT else "FAIL",
            }
        )
    return out


def render(run: dict[str, Any]) -> str:
    m = run["machine"]
    s = run["settings"]
    benches = {b["name"]: b for b in run["benchmarks"]}
    lines = [
        "# Portunus benchmarks",
        "",
        "Generated by `python -m bench.run` (bench/run.py); raw data in "
        "bench/results/latest.json. Loopback only; every contender forwards to the same "
        "origin in the same run.",
        "",
    ]
    if s.get("quick") or s.get("only"):
        lines += [
            "> **Partial/quick run** — fewer rounds and shorter measurements; not representative.",
            "",
        ]
    lines += [
        f"- Date: {run['date']} (suite took {run['seconds'] / 60:.1f} min)",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, "
        f"kernel {m['kernel']}, Python {m['python']}, commit {m['commit']}",
        "- Tools: " + "; ".join(f"{k}: {v}" for k, v in m["tools"].items()),
        f"- Load average (1/5/15 min) at start {run.get('load_start')}, at end "
        f"{run.get('load_end')}: anything else running on the machine adds noise",
        f"- Portunus: `{run.get('portunus_bin') or 'not found'}` "
        f"(shards: {run.get('portunus_shards') or 'default = one per CPU'}; "
        "idle-memory benchmark uses --shards 1)",
        "",
        "## Method",
        "",
        f"Each benchmark starts its origin, then every contender — direct (no forwarder), "
        f"portunus, haproxy, nginx (stream), socat — on its own port. Measurements run in "
        f"{s['rounds']} rounds (fewer where a benchmark says so); within a round the contenders run back to back and the "
        "starting contender rotates every round, so machine drift hits all of them alike. "
        "Tables show the median over rounds, the min – max and interquartile range of the "
        "headline value, the medians of the secondary values, and portunus ÷ contender "
        "(the ratio of medians). Peers run from bench/peers/run-peer: nginx with "
        "one worker per CPU, haproxy with nbthread = CPUs and splice-auto, socat with fork. "
        f"Durations: iperf3/wrk {s.get('duration')} s, sockperf TCP ping-pong "
        f"{s.get('latency_secs')} s, UDP {s.get('udp_secs')} s per measurement.",
        "",
    ]
    for b in run["benchmarks"]:
        if "error" in b:
            lines += [f"## {b['title']}", "", f"n/a — {short_reason(b['error'], 400)}", ""]
            continue
        lines += [f"## {b['title']}", "", f"`{b['name']}` — {b['method']}", ""]
        lines += table(b)
        for note in b.get("notes", []):
            lines += ["", f"Note: {note}"]
        lines += ["", f"({b['seconds']:.0f} s)", ""]
    lines += ["## Targets", "", "| target | portunus | status |", "|---|---|---|"]
    for t in targets(benches):
        status = t["status"] + (f" ({t['why']})" if t.get("why") else "")
        lines.append(f"| {t['target']} | {t['value'] or '–'} | {status} |")
    lines.append("")
    # The soak (bench/soak.py, 10+ min, run on its own) keeps its last table here.
    if SOAK.is_file():
        lines += [SOAK.read_text().rstrip(), ""]
    # Hand-written profile notes (what bounds each target not met) live next to this
    # file so that regenerating the tables keeps them.
    if ANALYSIS.is_file():
        lines += [ANALYSIS.read_text().rstrip(), ""]
    return "\n".join(lines)


def main() -> None:
    run = json.loads(Path(sys.argv[1]).read_text())
    sys.stdout.write(render(run))


if __name__ == "__main__":
    main()
