"""The forwarding rule: one model for every rule source and every process.

A ``Rule`` is what the supervisor binds and what a shard serves, whether it came
from a standalone TOML file, the server's SQLite store or a remote server link.
It travels between processes as a plain dict (``to_wire``/``from_wire``); parsing
and validation of operator input (``"30000-30099"``, ``"host:port@2"``) live here
too so that the CLI, the HTTP API and the TOML loader reject the same things with
the same ``validation.*`` codes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any

from portunus.bounds import (
    HEALTH_CHECK_INTERVAL,
    IDLE_TIMEOUT,
    MAX_HOST_LEN,
    MAX_SNI_LEN,
    PRIORITY,
)
from portunus.errors import ValidationError
from portunus.schema.check import validate
from portunus.schema.rule import MAX_TARGETS, RateLimit
from portunus.schema.types import PROTOCOLS, PROXY_VERSIONS
from portunus.text import is_ascii_digits

DEFAULT_RANGE_MAX_PORTS = 1024

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream.  ``port_end`` is set only for port-range rules."""

    host: str
    port: int
    priority: int = 1
    port_end: int | None = None
    proxy_protocol: str | None = None

    @property
    def label(self) -> str:
        """The ``target`` metric label: ``host:port`` (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port_end is not None and self.port_end != self.port:
            return f"{host}:{self.port}-{self.port_end}"
        return f"{host}:{self.port}"

    def to_wire(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "port_end": self.port_end,
            "priority": self.priority,
            "proxy_protocol": self.proxy_protocol,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Target:
        return cls(
            host=d["host"],
            port=int(d["port"]),
            priority=int(d.get("priority", 1)),
            port_end=d.get("port_end"),
            proxy_protocol=d.get("proxy_protocol"),
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """A validated rule as the data plane sees it.

    ``id`` is the metric label ``rule``: the numeric id on a server or client, the
    ``name`` in standalone mode.  ``listen_start == listen_end`` for one port.
    ``sni_fallback`` marks a pattern-less rule pushed onto a port already in SNI
    mode: the port stays in SNI mode while it holds any rule, even when only
    this fallback is left (set by ``control.slots.check_slot``, stored, on the wire).
    """

    id: str
    protocol: str
    listen_start: int
    listen_end: int
    targets: tuple[Target, ...]
    client: str = "local"
    owner: str = ""
    sni: str | None = None
    proxy_protocol: str | None = None
    prefer_ipv6: bool = False
    rate_limit: dict[str, int] | None = None
    health_check_interval_secs: float = 5.0
    sni_fallback: bool = False
    # Close a connection (TCP) or flow (UDP) that moved no byte for this long; None = off.
    idle_timeout_secs: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_range(self) -> bool:
        return self.listen_end != self.listen_start

    @property
    def ports(self) -> range:
        return range(self.listen_start, self.listen_end + 1)

    def listener_keys(self) -> list[str]:
        """Keys of the listening sockets this rule needs, e.g. ``tcp/8080``."""
        return [f"{self.protocol}/{p}" for p in self.ports]

    def binding(self) -> tuple[str, int, int]:
        """What decides the bound sockets; a change here means unbind + rebind."""
        return (self.protocol, self.listen_start, self.listen_end)

    def with_changes(self, **kw: Any) -> Rule:
        return replace(self, **kw)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "id": self.id,
            "client": self.client,
            "owner": self.owner,
            "protocol": self.protocol,
            "listen_start": self.listen_start,
            "listen_end": self.listen_end,
            "targets": [t.to_wire() for t in self.targets],
            "sni": self.sni,
            "proxy_protocol": self.proxy_protocol,
            "prefer_ipv6": self.prefer_ipv6,
            "rate_limit": self.rate_limit,
            "health_check_interval_secs": self.health_check_interval_secs,
        }
        if self.sni_fallback:  # only when set: peers that predate it see the same dict
            wire["sni_fallback"] = True
        if self.idle_timeout_secs is not None:  # likewise
            wire["idle_timeout_secs"] = self.idle_timeout_secs
        return wire

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Rule:
        return cls(
            id=str(d["id"]),
            client=d.get("client", "local"),
            owner=d.get("owner", "") or "",
            protocol=d["protocol"],
            listen_start=int(d["listen_start"]),
            listen_end=int(d["listen_end"]),
            targets=tuple(Target.from_wire(t) for t in d["targets"]),
            sni=d.get("sni"),
            proxy_protocol=d.get("proxy_protocol"),
            prefer_ipv6=bool(d.get("prefer_ipv6", False)),
            rate_limit=d.get("rate_limit") or None,
            health_check_interval_secs=float(d.get("health_check_interval_secs", 5.0)),
            sni_fallback=bool(d.get("sni_fallback", False)),
            idle_timeout_secs=float(d["idle_timeout_secs"])
            if d.get("idle_timeout_secs") is not None
            else None,
        )


# ---------------------------------------------------------------- parsing


def clip(value: Any, limit: int = 80) -> Any:
    """A string cut for an error message (a refusal must not echo a megabyte back);
    other values unchanged."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}…"
    return value


def parse_port(text: str | int, what: str = "port") -> int:
    """Parse one port number 1..65535."""
    if isinstance(text, bool):
        raise ValidationError("validation.port", f"{what} must be a number 1-65535", field=what)
    if isinstance(text, int):
        value = text
    else:
        s = text.strip()
        if not is_ascii_digits(s) or len(s) > 5:  # int() of 5000 digits raises, not refuses
            raise ValidationError(
                "validation.port", f"{what} {text[:20]!r} is not a number 1-65535", field=what
            )
        value = int(s)
    if not 1 <= value <= 65535:
        raise ValidationError("validation.port", f"{what} {value} is outside 1-65535", field=what)
    return value


def parse_port_range(text: str | int, what: str = "listen") -> tuple[int, int]:
    """Parse ``PORT`` or ``LO-HI`` into ``(lo, hi)`` with ``lo <= hi``."""
    if isinstance(text, int) and not isinstance(text, bool):
        p = parse_port(text, what)
        return p, p
    if not isinstance(text, str):
        raise ValidationError("validation.port", f"{what} must be PORT or LO-HI", field=what)
    s = text.strip()
    if "-" in s:
        lo_s, _, hi_s = s.partition("-")
        lo, hi = parse_port(lo_s, what), parse_port(hi_s, what)
        if lo > hi:
            raise ValidationError(
                "validation.port_range",
                f"{what} range {s!r} is reversed: write LO-HI with LO <= HI",
                field=what,
            )
        return lo, hi
    p = parse_port(s, what)
    return p, p


def validate_host(host: str, what: str = "target host") -> str:
    """Accept an IPv4/IPv6 literal or a DNS name; return it normalised."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if not h:
        raise ValidationError("validation.target_host", f"{what} is empty", field="host")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    name = h[:-1] if h.endswith(".") else h
    if len(name) > MAX_HOST_LEN or not all(_HOST_LABEL.match(lbl) for lbl in name.split(".")):
        raise ValidationError(
            "validation.target_host",
            f"{what} {clip(host)!r} is neither an IP address nor a valid DNS name "
            f"(at most {MAX_HOST_LEN} characters)",
            field="host",
        )
    return name.lower()


def split_host_port(text: str, what: str = "target") -> tuple[str, str]:
    """Split ``host:port`` / ``[v6]:port`` / ``host:LO-HI`` into host and port text."""
    s = text.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1 : end + 2] != ":":
            raise ValidationError(
                "validation.target", f"{what} {clip(text)!r}: write [IPv6]:PORT", field=what
            )
        return s[1:end], s[end + 2 :]
    host, sep, port = s.rpartition(":")
    if not sep or not host:
        raise ValidationError(
            "validation.target", f"{what} {clip(text)!r} must be HOST:PORT", field=what
        )
    if ":" in host:
        raise ValidationError(
            "validation.target",
            f"{what} {clip(text)!r}: put an IPv6 address in brackets, e.g. [::1]:80",
            field=what,
        )
    return host, port


def parse_target(text: str, what: str = "target") -> Target:
    """Parse ``host:port``, ``host:LO-HI`` or ``host:port@priority``."""
    s = text.strip()
    priority = 1
    if "@" in s:
        s, _, prio = s.rpartition("@")
        if not is_ascii_digits(prio) or len(prio) > 4 or not PRIORITY.contains(int(prio)):
            raise ValidationError(
                "validation.priority",
                f"{what} {text[:80]!r}: priority after @ must be an integer in {PRIORITY.text()}",
                field=what,
            )
        priority = int(prio)
    host, port_text = split_host_port(s, what)
    lo, hi = parse_port_range(port_text, what)
    return Target(
        host=validate_host(host),
        port=lo,
        port_end=hi if hi != lo else None,
        priority=priority,
    )


def validate_sni_pattern(pattern: str | None) -> str | None:
    """Exact host name or single-label wildcard ``*.example.com``; ``None`` = fallback."""
    if pattern is None:
        return None
    p = pattern.strip().lower().rstrip(".")
    if p == "" or p == "*":
        raise ValidationError(
            "validation.sni_pattern",
            "SNI pattern must be a host name or *.domain; omit --sni for the fallback rule",
            field="sni_pattern",
        )
    body = p[2:] if p.startswith("*.") else p
    if (
        len(p) > MAX_SNI_LEN
        or "*" in body
        or not all(_HOST_LABEL.match(lbl) for lbl in body.split("."))
    ):
        raise ValidationError(
            "validation.sni_pattern",
            f"SNI pattern {clip(pattern)!r} must be an exact name or a single-label wildcard like "
            f"*.example.com (at most {MAX_SNI_LEN} characters)",
            field="sni_pattern",
        )
    return p


def validate_rate_limit(raw: dict[str, Any] | None) -> dict[str, int] | None:
    """The set caps of ``raw`` checked against the ``RateLimit`` declaration (the
    same codes and words as a rule body's ``rate_limit``), None when none is set."""
    return validate(raw, RateLimit, "rate_limit").caps() if raw is not None else None


def build_rule(
    *,
    id: str,
    protocol: str,
    listen: tuple[int, int],
    targets: list[Target],
    client: str = "local",
    owner: str = "",
    sni: str | None = None,
    proxy_protocol: str | None = None,
    prefer_ipv6: bool = False,
    rate_limit: dict[str, Any] | None = None,
    health_check_interval_secs: float = 5.0,
    range_max_ports: int = DEFAULT_RANGE_MAX_PORTS,
    idle_timeout_secs: float | None = None,
) -> Rule:
    """Validate the cross-field constraints and return a ``Rule``.

    Every rule source funnels through here, so the same input is refused with the
    same code whether it arrives from TOML, the CLI or HTTP.
    """
    if protocol not in PROTOCOLS:
        raise ValidationError(
            "validation.protocol",
            f"protocol {clip(protocol)!r} must be tcp or udp",
            field="protocol",
        )
    lo, hi = listen
    count = hi - lo + 1
    if count > range_max_ports:
        raise ValidationError(
            "validation.range_too_large",
            f"range {lo}-{hi} spans {count} ports; the limit is range_rule_max_ports = {range_max_ports}",
            field="listen",
        )
    if not targets:
        raise ValidationError(
            "validation.targets", "a rule needs at least one target", field="targets"
        )
    if len(targets) > MAX_TARGETS:
        raise ValidationError(
            "validation.targets",
            f"a rule takes at most {MAX_TARGETS} targets, got {len(targets)}",
            field="targets",
        )
    fixed: list[Target] = []
    for t in targets:
        t_lo, t_hi = t.port, t.port_end if t.port_end is not None else t.port
        if lo != hi or t_lo != t_hi:
            if (t_hi - t_lo) != (hi - lo):
                raise ValidationError(
                    "validation.range_length_mismatch",
                    f"listen range {lo}-{hi} has {count} ports but target {t.label} has {t_hi - t_lo + 1}",
                    field="targets",
                )
            t = replace(t, port_end=t_hi)
        if t.proxy_protocol is not None and t.proxy_protocol not in PROXY_VERSIONS:
            raise ValidationError(
                "validation.proxy_protocol",
                f"proxy_protocol {clip(t.proxy_protocol)!r} must be v1 or v2",
                field="proxy_protocol",
            )
        if not PRIORITY.contains(t.priority):
            raise ValidationError(
                "validation.priority",
                f"target priority must be an integer in {PRIORITY.text()}",
                field="targets",
            )
        fixed.append(t)
    if proxy_protocol is not None and proxy_protocol not in PROXY_VERSIONS:
        raise ValidationError(
            "validation.proxy_protocol",
            f"proxy_protocol {clip(proxy_protocol)!r} must be v1 or v2",
            field="proxy_protocol",
        )
    if protocol == "udp" and (proxy_protocol is not None or any(t.proxy_protocol for t in fixed)):
        # The shard writes PROXY headers on TCP streams only; accepting it for UDP
        # would forward bare datagrams to an origin expecting a header.
        raise ValidationError(
            "validation.proxy_protocol",
            "PROXY protocol is TCP-only: a UDP rule cannot send a PROXY header",
            field="proxy_protocol" if proxy_protocol is not None else "targets",
        )
    sni = validate_sni_pattern(sni)
    if sni is not None and (protocol != "tcp" or lo != hi):
        raise ValidationError(
            "validation.sni_on_unsupported_rule",
            "SNI routing works only on single-port TCP rules (not UDP, not port ranges)",
            field="sni_pattern",
        )
    health_check_interval_secs = HEALTH_CHECK_INTERVAL.check(
        health_check_interval_secs, "health_check_interval_secs"
    )
    if idle_timeout_secs is not None:
        idle_timeout_secs = IDLE_TIMEOUT.check(idle_timeout_secs, "idle_timeout_secs")
    fixed.sort(key=lambda t: t.priority)
    return Rule(
        id=str(id),
        client=client,
        owner=owner or "",
        protocol=protocol,
        listen_start=lo,
        listen_end=hi,
        targets=tuple(fixed),
        sni=sni,
        proxy_protocol=proxy_protocol,
        prefer_ipv6=prefer_ipv6,
        rate_limit=validate_rate_limit(rate_limit),
        health_check_interval_secs=health_check_interval_secs,
        idle_timeout_secs=float(idle_timeout_secs) if idle_timeout_secs is not None else None,
    )
