"""``portunus-standalone stats``: per-rule counters scraped from /metrics."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import click

from portunus.metrics import catalog as c

# Family name (as the text parser reports it: a counter's without _total) -> field.
FIELDS = {c.BY_NAME[name].family_name: field for name, field in c.RULE_FIELDS.items()}


class WrongInstance(Exception):
    """The endpoint is served by another program or another config; ``str()`` says which."""


def scrape(metrics_listen: str, config: str | None = None) -> dict[str, dict[str, float]]:
    """Per-rule counters from ``metrics_listen``; with ``config``, only when that
    endpoint is served by ``portunus-standalone --config <config>``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_listen}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    rules: dict[str, dict[str, float]] = {}
    families = list(text_string_to_metric_families(text))
    if config is not None:
        _check_instance(families, metrics_listen, config)
    for family in families:
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


def _check_instance(families: list[Any], metrics_listen: str, config: str) -> None:
    info = next((f for f in families if f.name == c.INSTANCE_INFO.name), None)
    labels = info.samples[0].labels if info is not None and info.samples else {}
    if labels.get("kind") == "standalone" and labels.get("config") == config:
        return
    if not labels:
        who = "a program that is not portunus-standalone"
    elif labels.get("kind") != "standalone":
        who = (
            f"portunus-{labels.get('kind')}"
            if labels.get("kind") in ("server", "client")
            else "another program"
        )
    else:
        who = f"portunus-standalone --config {labels.get('config')}"
    raise WrongInstance(
        f"http://{metrics_listen}/metrics is served by {who}, not by portunus-standalone --config {config}; "
        f"its rules are not shown. Is this config running? If so, give it its own metrics_listen"
    )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f}"


def table(rules: dict[str, dict[str, float]], rates: dict[str, tuple[float, float]] | None) -> str:
    head = ["RULE", "BYTES_IN", "BYTES_OUT", "CONNS", "ACTIVE"] + (
        ["IN/s", "OUT/s"] if rates is not None else []
    )
    rows = [head]
    for name in sorted(rules):
        r = rules[name]
        row = [
            name,
            human(r["bytes_in"]),
            human(r["bytes_out"]),
            f"{r['connections_total']:.0f}",
            f"{r['active_connections']:.0f}",
        ]
        if rates is not None:
            rin, rout = rates.get(name, (0.0, 0.0))
            row += [human(rin) + "/s", human(rout) + "/s"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def show_stats(
    metrics_listen: str, watch: bool, interval: float, fmt: str, config: str | None = None
) -> int:
    prev: tuple[float, dict[str, dict[str, float]]] | None = None
    while True:
        try:
            rules = scrape(metrics_listen, config)
        except WrongInstance as exc:
            click.echo(f"error: wrong_instance: {exc}", err=True)
            return 1
        except (urllib.error.URLError, OSError) as exc:
            click.echo(
                f"error: unavailable: cannot read http://{metrics_listen}/metrics ({exc}); "
                "is portunus-standalone running with this config?",
                err=True,
            )
            return 1
        now = time.monotonic()
        rates: dict[str, tuple[float, float]] | None = None
        if prev is not None:
            dt = max(now - prev[0], 1e-6)
            rates = {
                k: (
                    (v["bytes_in"] - prev[1].get(k, v)["bytes_in"]) / dt,
                    (v["bytes_out"] - prev[1].get(k, v)["bytes_out"]) / dt,
                )
                for k, v in rules.items()
            }
        if fmt == "json":
            out: dict[str, Any] = {
                "rules": [
                    {"rule": k, **{f: int(v) for f, v in r.items()}}
                    for k, r in sorted(rules.items())
                ]
            }
            if rates is not None:
                for row in out["rules"]:
                    row["bytes_in_per_sec"], row["bytes_out_per_sec"] = rates.get(
                        row["rule"], (0.0, 0.0)
                    )
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
