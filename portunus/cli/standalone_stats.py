"""``portunus-standalone stats``: per-rule counters scraped from /metrics."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import click

FIELDS = {
    "portunus_rule_bytes_in": "bytes_in",
    "portunus_rule_bytes_out": "bytes_out",
    "portunus_rule_connections": "connections_total",
    "portunus_rule_active_connections": "active_connections",
}


def scrape(metrics_listen: str) -> dict[str, dict[str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_listen}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    rules: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        key = FIELDS.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            rule = sample.labels.get("rule", "")
            row = rules.setdefault(rule, dict.fromkeys(FIELDS.values(), 0.0))
            row[key] += sample.value
    return rules


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f}"


def table(rules: dict[str, dict[str, float]], rates: dict[str, tuple[float, float]] | None) -> str:
    head = ["RULE", "BYTES_IN", "BYTES_OUT", "CONNS", "ACTIVE"] + (["IN/s", "OUT/s"] if rates is not None else [])
    rows = [head]
    for name in sorted(rules):
        r = rules[name]
        row = [name, human(r["bytes_in"]), human(r["bytes_out"]), f"{r['connections_total']:.0f}",
               f"{r['active_connections']:.0f}"]
        if rates is not None:
            rin, rout = rates.get(name, (0.0, 0.0))
            row += [human(rin) + "/s", human(rout) + "/s"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def show_stats(metrics_listen: str, watch: bool, interval: float, fmt: str) -> int:
    prev: tuple[float, dict[str, dict[str, float]]] | None = None
    while True:
        try:
            rules = scrape(metrics_listen)
        except (urllib.error.URLError, OSError) as exc:
            click.echo(f"error: unavailable: cannot read http://{metrics_listen}/metrics ({exc}); "
                       "is portunus-standalone running with this config?", err=True)
            return 1
        now = time.monotonic()
        rates: dict[str, tuple[float, float]] | None = None
        if prev is not None:
            dt = max(now - prev[0], 1e-6)
            rates = {
                k: ((v["bytes_in"] - prev[1].get(k, v)["bytes_in"]) / dt,
                    (v["bytes_out"] - prev[1].get(k, v)["bytes_out"]) / dt)
                for k, v in rules.items()
            }
        if fmt == "json":
            out: dict[str, Any] = {"rules": [{"rule": k, **{f: int(v) for f, v in r.items()}}
                                             for k, r in sorted(rules.items())]}
            if rates is not None:
                for row in out["rules"]:
                    row["bytes_in_per_sec"], row["bytes_out_per_sec"] = rates.get(row["rule"], (0.0, 0.0))
            click.echo(json.dumps(out))
        else:
            if watch and sys.stdout.isatty():
                click.clear()
            click.echo(table(rules, rates if watch else None))
        if not watch:
            return 0
        prev = (now, rules)
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return 0
