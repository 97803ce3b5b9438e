"""The push and caps forms as the same JSON bodies the API takes.

Form inputs are named after the body's paths (``targets[0].host``,
``rate_limit.bandwidth_in_bps``) so the API's field errors land next to the right
input.  Two inputs are friendlier than the body: ``listen`` takes ``PORT`` or
``LO-HI`` and a target's ``port`` takes ``PORT`` or ``LO-HI``, as on the CLI.
Values that are not numbers stay strings, so the schema check reports them in
the API's own words.
"""

from __future__ import annotations

import re
from typing import Any

from portunus.schema.rule import MAX_TARGETS, RATE_LIMIT_ALL_KEYS, RATE_LIMIT_KEYS

TARGET_ROWS = 3
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_INT = re.compile(r"^\s*\d+\s*$")
CAP_LABELS = {
    "bandwidth_in_bps": "Bandwidth in (bytes/s)",
    "bandwidth_out_bps": "Bandwidth out (bytes/s)",
    "new_connections_per_sec": "New connections per second",
    "concurrent_connections": "Concurrent connections",
}


def _number(value: str) -> int | str:
    return int(value) if _INT.match(value) else value


def _ports(value: str) -> tuple[int | str, int | str] | int | str:
    m = _RANGE.match(value)
    if m:
        return int(m.group(1)), int(m.group(2))
    return _number(value)


def caps_from_form(form: dict[str, str]) -> dict[str, Any]:
    """``rate_limit.<key>`` inputs -> the caps object (empty inputs are uncapped)."""
    return {
        k: _number(form[f"rate_limit.{k}"])
        for k in RATE_LIMIT_ALL_KEYS
        if form.get(f"rate_limit.{k}")
    }


def rule_body(form: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "client": form.get("client") or "local",
        "protocol": form.get("protocol") or "tcp",
    }
    listen = _ports(form.get("listen", ""))
    if isinstance(listen, tuple):
        body["listen_port_start"], body["listen_port_end"] = listen
    elif listen != "":
        body["listen_port"] = listen
    targets: list[dict[str, Any]] = []
    for i in range(MAX_TARGETS):
        host, port = form.get(f"targets[{i}].host", ""), form.get(f"targets[{i}].port", "")
        if not host and not port:
            continue
        target: dict[str, Any] = {"host": host}
        ports = _ports(port)
        if isinstance(ports, tuple):
            target["port_start"], target["port_end"] = ports
        elif ports != "":
            target["port"] = ports
        if form.get(f"targets[{i}].priority"):
            target["priority"] = _number(form[f"targets[{i}].priority"])
        targets.append(target)
    body["targets"] = targets
    if form.get("sni_pattern"):
        body["sni_pattern"] = form["sni_pattern"]
    if form.get("proxy_protocol") in ("v1", "v2"):
        body["proxy_protocol"] = form["proxy_protocol"]
    elif form.get("proxy_protocol"):
        body["proxy_protocol"] = form["proxy_protocol"]  # the schema names the allowed values
    if form.get("prefer_ipv6"):
        body["prefer_ipv6"] = True
    caps = caps_from_form(form)
    if caps:
        body["rate_limit"] = caps
    if form.get("owner"):
        body["owner"] = form["owner"]
    return body


def form_field(path: str) -> str:
    """The input an API error path belongs to."""
    if path.startswith("listen_port"):
        return "listen"
    m = re.match(r"^(targets\[\d+\])\.(port_start|port_end)$", path)
    if m:
        return f"{m.group(1)}.port"
    return path


def target_rows(form: dict[str, str]) -> int:
    """How many target rows to show: the filled ones plus one, at least three."""
    filled = [
        i
        for i in range(MAX_TARGETS)
        if form.get(f"targets[{i}].host") or form.get(f"targets[{i}].port")
    ]
    return min(MAX_TARGETS, max(TARGET_ROWS, (max(filled) + 2) if filled else 0))


def form_from_caps(caps: dict[str, Any] | None) -> dict[str, str]:
    return {f"rate_limit.{k}": str(v) for k, v in (caps or {}).items() if v is not None}


CAP_FIELDS = [(k, CAP_LABELS[k]) for k in RATE_LIMIT_KEYS]
