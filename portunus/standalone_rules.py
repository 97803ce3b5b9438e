"""One ``[[rule]]`` table of a standalone TOML file → a ``Rule``, or every problem
with the key it sits on (``portunus.config.load_standalone`` turns keys into line
numbers).  The keys shared with the HTTP rule body are checked against the
``StandaloneRule`` declaration; the keys with a TOML syntax of their own
(``target = "host:port@prio"``, ``listen_ports = "LO-HI"``, ``[[rule.targets]]``)
are parsed here."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import UNSET

from portunus.bounds import MAX_NAME_LEN, PRIORITY
from portunus.errors import PortunusError
from portunus.rules import (
    PROXY_VERSIONS,
    Rule,
    Target,
    build_rule,
    clip,
    parse_port_range,
    parse_target,
    validate_host,
    validate_sni_pattern,
)
from portunus.schema.check import problems
from portunus.schema.standalone import TARGET_KEYS, StandaloneRule

_RULE_KEYS = frozenset(StandaloneRule.__struct_fields__)
_RULE_NAME = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_NAME_LEN}}}")


def rule_from_table(
    t: dict[str, Any], max_ports: int
) -> tuple[Rule | None, list[tuple[str | None, str]]]:
    """Build one standalone rule; return it or *every* ``(key, message)`` error.

    Each key is checked on its own first, so ``--check`` lists every bad key of a
    rule at once: the keys shared with the HTTP rule body against the
    ``StandaloneRule`` declaration (``portunus.schema.standalone``, the body's
    types, ranges and codes), the keys with a TOML syntax of their own here;
    ``build_rule`` then adds only the cross-field checks."""
    errs: list[tuple[str | None, str]] = []
    for unknown in t:
        if unknown not in _RULE_KEYS:
            errs.append((unknown, f"unknown key {clip(unknown)!r} in [[rule]]"))
    known = {k: v for k, v in t.items() if k in _RULE_KEYS}
    for problem in problems(known, "StandaloneRule"):
        key = problem.field.split(".")[0].split("[")[0] or None
        errs.append((key, f"{problem.code}: {problem.message}"))
    name = t.get("name")
    if not isinstance(name, str) or not _RULE_NAME.fullmatch(name or ""):
        errs.append(
            (
                "name" if "name" in t else None,
                f'every [[rule]] needs name = "..." (letters, digits, _ . -; at most {MAX_NAME_LEN})',
            )
        )
    if "listen_port" in t and "listen_ports" in t:
        errs.append(("listen_ports", "give listen_port or listen_ports, not both"))
    listen: tuple[int, int] | None = None
    try:
        if "listen_port" in t:
            v = t["listen_port"]
            if not isinstance(v, int) or isinstance(v, bool):
                raise PortunusError(
                    "validation.port",
                    'listen_port must be a number; use listen_ports = "LO-HI" for a range',
                )
            listen = parse_port_range(v, "listen_port")
        elif "listen_ports" in t:
            raw_ports = t["listen_ports"]
            listen = parse_port_range(
                raw_ports if isinstance(raw_ports, (str, int)) else "?", "listen_ports"
            )
        else:
            errs.append((None, '[[rule]] needs listen_port = PORT or listen_ports = "LO-HI"'))
    except PortunusError as exc:
        errs.append(("listen_port" if "listen_port" in t else "listen_ports", exc.message))
    targets = _targets_from_table(t, errs)
    sni = t.get("sni")
    if isinstance(sni, str):  # its type is the declaration's
        try:
            validate_sni_pattern(sni)
        except PortunusError as exc:
            errs.append(("sni", f"{exc.code}: {exc.message}"))
    if errs or listen is None or not isinstance(name, str):
        return None, errs
    decl = msgspec.convert(known, StandaloneRule, strict=True)  # checked above
    try:
        rule = build_rule(
            id=name,
            protocol=decl.protocol,
            listen=listen,
            targets=targets,
            sni=sni,
            proxy_protocol=None if decl.proxy_protocol is UNSET else decl.proxy_protocol,
            prefer_ipv6=decl.prefer_ipv6,
            rate_limit=None if decl.rate_limit is UNSET else decl.rate_limit.caps(),
            health_check_interval_secs=decl.health_check_interval_secs,
            range_max_ports=max_ports,
            idle_timeout_secs=decl.idle_timeout_secs,
        )
    except PortunusError as exc:
        field_map = {
            "protocol": "protocol",
            "sni_pattern": "sni",
            "listen": "listen_ports" if "listen_ports" in t else "listen_port",
        }
        key = exc.details.get("field")
        key = field_map.get(key, key) if isinstance(key, str) else None
        if key is not None and key not in t:
            key = "target" if key == "targets" and "target" in t else (key if key in t else None)
        return None, [(key, f"{exc.code}: {exc.message}")]
    return rule, []


def _targets_from_table(t: dict[str, Any], errs: list[tuple[str | None, str]]) -> list[Target]:
    """``target = "host:port@prio"`` or ``targets = [{...}]``; problems go to ``errs``."""
    targets: list[Target] = []
    if "target" in t and "targets" in t:
        errs.append(("targets", "give target or targets, not both"))
    if "target" in t:
        try:
            if not isinstance(t["target"], str):
                raise PortunusError("validation.target", 'target must be "host:port"')
            targets.append(parse_target(t["target"]))
        except PortunusError as exc:
            errs.append(("target", exc.message))
    elif "targets" in t:
        raw = t["targets"]
        if not isinstance(raw, list) or not raw:
            errs.append(("targets", "targets must be a non-empty list of {host, port, priority}"))
        else:
            for i, item in enumerate(raw):
                try:
                    targets.append(_target_from_table(item, i))
                except PortunusError as exc:
                    errs.append(("targets", exc.message))
    else:
        errs.append((None, '[[rule]] needs target = "host:port" or targets = [...]'))
    return targets


def _target_from_table(item: Any, i: int) -> Target:
    if not isinstance(item, dict):
        raise PortunusError(
            "validation.targets", f"targets[{i}] must be a table {{host=..., port=...}}"
        )
    unknown = set(item) - TARGET_KEYS
    if unknown:
        raise PortunusError(
            "validation.targets", f"targets[{i}] has unknown key(s) {', '.join(sorted(unknown))}"
        )
    if "host" not in item or ("port" not in item and "ports" not in item):
        raise PortunusError("validation.targets", f"targets[{i}] needs host and port")
    if not isinstance(item["host"], str):
        raise PortunusError("validation.target_host", f"targets[{i}].host must be a string")
    host = validate_host(item["host"])
    if "ports" in item:
        lo, hi = parse_port_range(str(item["ports"]), f"targets[{i}].ports")
    else:
        lo, hi = parse_port_range(item["port"], f"targets[{i}].port")
        if "port_end" in item:
            hi = parse_port_range(item["port_end"], f"targets[{i}].port_end")[0]
    prio = PRIORITY.check(item.get("priority", 1), f"targets[{i}].priority", "validation.priority")
    pp = item.get("proxy_protocol")
    if pp is not None and pp not in PROXY_VERSIONS:
        raise PortunusError(
            "validation.proxy_protocol", f'targets[{i}].proxy_protocol must be "v1" or "v2"'
        )
    return Target(
        host=host, port=lo, port_end=hi if hi != lo else None, priority=prio, proxy_protocol=pp
    )
