"""Text rendering of API results for people: aligned tables, byte units, one-line
rule summaries.  JSON output never goes through here (scripts get the API shapes
verbatim); these functions only read the documented keys and tolerate missing
ones, so a newer server adding fields cannot break an older CLI."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
# Short names for rate-limit keys in the INFO column (full names are in --format json).
_CAP_NAMES = {
    "bandwidth_in_bps": "bw_in",
    "bandwidth_out_bps": "bw_out",
    "new_connections_per_sec": "new_conn/s",
    "concurrent_connections": "max_conn",
}


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
        lines.append(line.rstrip())
    return "\n".join(lines)


def human_bytes(n: Any) -> str:
    """``1.2 MiB (1234567)``; plain ``512 B`` below one KiB."""
    if not isinstance(n, int) or isinstance(n, bool):
        return "-" if n is None else str(n)
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit} ({n})"
    raise AssertionError("unreachable")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def listen_text(rule: dict[str, Any]) -> str:
    if "listen_port_start" in rule and rule.get("listen_port_start") is not None:
        return f"{rule['listen_port_start']}-{rule.get('listen_port_end')}"
    return str(rule.get("listen_port", "?"))


def target_text(t: dict[str, Any], with_priority: bool) -> str:
    if t.get("port_start") is not None:
        port = f"{t['port_start']}-{t.get('port_end')}"
    else:
        port = str(t.get("port", "?"))
    text = f"{_host(str(t.get('host', '?')))}:{port}"
    return f"{text}@{t.get('priority', 1)}" if with_priority else text


def targets_text(rule: dict[str, Any]) -> str:
    """``host:port`` for one plain target, else ``a:80@1,b:80@2`` (the CLI's own syntax)."""
    targets = rule.get("targets") or []
    show_prio = len(targets) > 1 or any(t.get("priority", 1) != 1 for t in targets)
    return ",".join(target_text(t, show_prio) for t in targets)


def rule_info(rule: dict[str, Any]) -> str:
    """The INFO column: only what differs from a plain rule."""
    parts: list[str] = []
    if rule.get("sni_pattern"):
        parts.append(f"sni={rule['sni_pattern']}")
    if rule.get("proxy_protocol"):
        parts.append(f"proxy={rule['proxy_protocol']}")
    if rule.get("prefer_ipv6"):
        parts.append("prefer_ipv6")
    for key, value in (rule.get("rate_limit") or {}).items():
        if value is None:
            continue
        base = key.removesuffix("_burst")
        name = _CAP_NAMES.get(base, base) + ("_burst" if key.endswith("_burst") else "")
        parts.append(f"{name}={value}")
    if rule.get("owner"):
        parts.append(f"owner={rule['owner']}")
    if rule.get("failure_reason"):
        parts.append(f"reason={rule['failure_reason']}")
    return " ".join(parts)


def rule_line(rule: dict[str, Any]) -> str:
    """``rule 7 active: local tcp 18080 -> 127.0.0.1:8080 [sni=...]``"""
    head = (
        f"rule {rule.get('id')} {rule.get('state', '?')}: {rule.get('client', '?')} "
        f"{rule.get('protocol', 'tcp')} {listen_text(rule)} -> {targets_text(rule)}"
    )
    info = rule_info(rule)
    return f"{head} [{info}]" if info else head


def rules_table(rules: list[dict[str, Any]]) -> str:
    if not rules:
        return "no rules"
    return table(
        ("ID", "CLIENT", "PROTO", "LISTEN", "TARGETS", "STATE", "INFO"),
        (
            (
                r.get("id"),
                r.get("client"),
                r.get("protocol"),
                listen_text(r),
                targets_text(r),
                r.get("state"),
                rule_info(r),
            )
            for r in rules
        ),
    )


def _cell(key: str, value: Any) -> str:
    if key.startswith("bytes"):
        return human_bytes(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "-" if value is None else str(value)


def dict_table(entries: list[dict[str, Any]]) -> str:
    """A table of same-shaped dicts (per-port, per-target stats); byte keys humanized."""
    keys: list[str] = []
    for e in entries:
        keys.extend(k for k in e if k not in keys)
    return table([k.upper() for k in keys], ([_cell(k, e.get(k)) for k in keys] for e in entries))


def stats_text(stats: dict[str, Any]) -> str:
    rows = [
        ("bytes in", human_bytes(stats.get("bytes_in"))),
        ("bytes out", human_bytes(stats.get("bytes_out"))),
        ("connections total", stats.get("connections_total")),
        ("active connections", stats.get("active_connections")),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"rule {stats.get('id')}"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    for key, title in (("per_port", "per port"), ("per_target", "per target")):
        entries = stats.get(key)
        if entries is not None:
            out.append("")
            out.append(f"{title}:")
            out.append(dict_table(entries) if entries else "(none)")
    return "\n".join(out)


def clients_table(clients: list[dict[str, Any]]) -> str:
    if not clients:
        return "no clients"
    return table(
        ("ID", "NAME", "STATE", "REMOTE", "SINCE", "VERSION", "RULES", "CAPABILITIES"),
        (
            (
                c.get("client_id"),
                c.get("client_name"),
                "connected" if c.get("connected") else "offline",
                c.get("remote_addr") or "-",
                c.get("connected_since") or "-",
                c.get("version") or "-",
                c.get("rule_count", 0),
                ",".join(c.get("capabilities") or []) or "-",
            )
            for c in clients
        ),
    )


def audit_table(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no audit entries"
    return table(
        ("ID", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "ERROR"),
        (
            (
                e.get("id"),
                e.get("ts"),
                e.get("actor"),
                e.get("action"),
                e.get("target") or "-",
                e.get("outcome"),
                e.get("error_code") or "",
            )
            for e in entries
        ),
    )


def id_list(ids: list[int]) -> str:
    """``1, 2, 3`` or ``none``: the ids a removal took with it, for one line of text."""
    return ", ".join(str(i) for i in ids) if ids else "none"
