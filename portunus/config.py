"""Settings for the three entry points, and the standalone TOML loader.

One ``Settings`` dataclass carries every key of server.toml / standalone TOML with
its documented default (docs/reference/config.md); unknown keys are errors (a typo must not silently
fall back to a default).  The standalone loader reports *every* problem with the
line it sits on (``file:line: message``), because ``tomllib`` gives values but no
positions: we find positions by scanning the text for the ``[[rule]]`` headers and
``key =`` lines.  One ``[[rule]]`` table is checked in ``portunus.standalone_rules``.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from portunus.bounds import SETTINGS as SETTING_BOUNDS
from portunus.errors import PortunusError
from portunus.rules import (
    Rule,
    validate_host,
)
from portunus.standalone_rules import rule_from_table

SYSTEM_DATA_DIR = "/var/lib/portunus"
SYSTEM_RUNTIME_DIR = "/run/portunus"
SYSTEM_CONFIG = "/etc/portunus/server.toml"
# /metrics defaults differ per program so the three can share one host:
# server 7081 (metrics_listen), edge client 7082 (--metrics-listen), standalone 7083.
CLIENT_METRICS_LISTEN = "127.0.0.1:7082"
STANDALONE_METRICS_LISTEN = "127.0.0.1:7083"


@dataclass
class Settings:
    """Every tunable with its contract default."""

    data_dir: str = SYSTEM_DATA_DIR
    runtime_dir: str = ""
    operator_http_listen: str = "127.0.0.1:7080"
    metrics_listen: str = "127.0.0.1:7081"
    control_listen: str = "0.0.0.0:7443"
    listen_address: str = "0.0.0.0"
    shutdown_drain_timeout_secs: float = 30.0
    range_rule_max_ports: int = 1024
    udp_flow_idle_secs: float = 60.0
    udp_max_flows: int = 1024
    connect_timeout_secs: float = 5.0
    log_format: str = "json"
    log_level: str = "info"
    operator_token: str | None = None
    ack_timeout_secs: float = 2.0
    stats_stream_interval_secs: float = 1.0
    # Web UI traffic history: how often control samples every rule's counters.
    traffic_sample_interval_secs: float = 10.0
    # Edge gateway, before a peer authenticated (portunus.control.fleet.preauth).
    edge_preauth_max_connections: int = 128
    edge_preauth_max_per_source: int = 16
    edge_handshake_timeout_secs: float = 10.0
    edge_preauth_park_secs: float = 25.0
    # The HTTP listeners (API and /metrics), before a request is complete
    # (portunus.web.limits).
    http_request_timeout_secs: float = 10.0
    http_max_connections: int = 256
    # An SNI port's shard waits this long for a complete ClientHello (shard.sni_handler).
    sni_client_hello_timeout_secs: float = 5.0
    shards: int = 0  # 0 = one per CPU
    extra: dict[str, Any] = field(default_factory=dict)
    config_path: str = ""  # the file these settings were read from ("" = defaults only)

    @property
    def socket_path(self) -> str:
        return os.path.join(self.runtime_dir, "control.sock")

    @property
    def metrics_dir(self) -> str:
        return os.path.join(self.runtime_dir, "metrics")

    @property
    def db_path(self) -> str:
        return os.path.join(self.data_dir, "state.db")

    @property
    def token_path(self) -> str:
        return os.path.join(self.data_dir, "operator.token")

    def shard_count(self) -> int:
        return self.shards if self.shards > 0 else (os.cpu_count() or 1)


_TYPES: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else object for f in fields(Settings)
}
_SETTING_KEYS = {f.name for f in fields(Settings)} - {
    "extra",
    "data_dir",
    "runtime_dir",
    "shards",
    "config_path",
}
_FLOAT_KEYS = {
    "shutdown_drain_timeout_secs",
    "udp_flow_idle_secs",
    "connect_timeout_secs",
    "ack_timeout_secs",
    "stats_stream_interval_secs",
    "edge_handshake_timeout_secs",
    "edge_preauth_park_secs",
    "traffic_sample_interval_secs",
    "http_request_timeout_secs",
    "sni_client_hello_timeout_secs",
}
_INT_KEYS = {
    "range_rule_max_ports",
    "udp_max_flows",
    "edge_preauth_max_connections",
    "edge_preauth_max_per_source",
    "http_max_connections",
}
_STR_KEYS = {
    "operator_http_listen",
    "metrics_listen",
    "control_listen",
    "listen_address",
    "log_format",
    "log_level",
    "operator_token",
}


def resolve_runtime_dir(data_dir: str) -> str:
    """PORTUNUS_RUNTIME_DIR, else /run/portunus for the system data dir,
    else <data-dir>/run (so a developer can run from a checkout without root)."""
    env = os.environ.get("PORTUNUS_RUNTIME_DIR")
    if env:
        return env
    if os.path.abspath(data_dir) == SYSTEM_DATA_DIR:
        return SYSTEM_RUNTIME_DIR
    return os.path.join(os.path.abspath(data_dir), "run")


def parse_listen(text: str, what: str = "listen address") -> tuple[str, int]:
    """Parse ``host:port`` / ``[v6]:port`` for the appliance's own listeners."""
    from portunus.rules import parse_port, split_host_port

    host, port = split_host_port(text, what)
    return validate_host(host, what), parse_port(port, what)


def _check_setting(key: str, value: Any) -> Any:
    """Type-check one top-level key; return the coerced value or raise ValueError."""
    if key in _FLOAT_KEYS or key in _INT_KEYS:
        return SETTING_BOUNDS[key].check(value, key, "validation.config")
    if key in _STR_KEYS:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string")
        if key == "log_format" and value not in ("json", "text"):
            raise ValueError('log_format must be "json" or "text"')
        if key == "log_level" and value not in ("debug", "info", "warning", "error"):
            raise ValueError('log_level must be "debug", "info", "warning" or "error"')
        if key.endswith("_listen"):
            parse_listen(value, key)
        if key == "listen_address":
            validate_host(value, key)
        return value
    raise ValueError(f"unknown key {key!r}")


def apply_settings(
    settings: Settings, table: dict[str, Any], skip: frozenset[str] | set[str] = frozenset()
) -> list[tuple[str, str]]:
    """Apply top-level keys to settings; return ``[(key, error message)]``."""
    errors: list[tuple[str, str]] = []
    for key, value in table.items():
        if key in skip:
            continue
        if key not in _SETTING_KEYS:
            errors.append((key, f"unknown key {key!r}"))
            continue
        try:
            setattr(settings, key, _check_setting(key, value))
        except (ValueError, PortunusError) as exc:
            errors.append((key, getattr(exc, "message", str(exc))))
    return errors


class ConfigError(Exception):
    """A config file is invalid; ``errors`` are ``file:line: message`` strings."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def load_server_settings(data_dir: str, config_path: str | None) -> Settings:
    """Settings for ``portunus-server``: defaults, then server.toml if present."""
    settings = Settings(data_dir=os.path.abspath(data_dir))
    settings.runtime_dir = resolve_runtime_dir(settings.data_dir)
    path = config_path
    if path is None:
        for candidate in (os.path.join(settings.data_dir, "server.toml"), SYSTEM_CONFIG):
            if os.path.exists(candidate):
                path = candidate
                break
    if path is not None:
        # reload re-reads it; serve checks its mode if it holds operator_token
        settings.config_path = os.path.abspath(path)
        text = _read(path)
        doc = _parse_toml(path, text)
        errs = apply_settings(settings, doc)
        if errs:
            locator = _Locator(text)
            raise ConfigError(
                _in_line_order(
                    [(locator.top_key(k), f"{path}:{locator.top_key(k)}: {m}") for k, m in errs]
                )
            )
    return settings


# ------------------------------------------------------------- standalone


def _in_line_order(errors: list[tuple[int, str]]) -> list[str]:
    """Messages sorted by line (stable: same-line errors keep their order)."""
    return [msg for _line, msg in sorted(errors, key=lambda e: e[0])]


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None


def _parse_toml(path: str, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        line = m.group(1) if m else "1"
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
        raise ConfigError([f"{path}:{line}: TOML syntax error: {msg}"]) from None


class _Locator:
    """Find the line of a top-level key or of a key inside the n-th [[rule]]."""

    _HEADER = re.compile(r"^\s*\[\[\s*rule\s*\]\]")
    _TABLE = re.compile(r"^\s*\[")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.rule_starts = [i + 1 for i, ln in enumerate(self.lines) if self._HEADER.match(ln)]

    def top_key(self, key: str) -> int:
        for i, ln in enumerate(self.lines):
            if self._TABLE.match(ln):
                break
            m = self._KEY.match(ln)
            if m and m.group(1).strip("\"'") == key:
                return i + 1
        return 1

    def rule_key(self, index: int, key: str | None) -> int:
        if index >= len(self.rule_starts):
            return 1
        start = self.rule_starts[index]
        if key is None:
            return start
        for i in range(start, len(self.lines)):
            ln = self.lines[i]
            if self._TABLE.match(ln):
                break
            m = self._KEY.match(ln)
            if m and m.group(1).strip("\"'") == key:
                return i + 1
        return start


def load_standalone(path: str) -> tuple[Settings, list[Rule]]:
    """Parse and validate a standalone TOML file; raise ConfigError listing all errors."""
    text = _read(path)
    doc = _parse_toml(path, text)
    loc = _Locator(text)
    settings = Settings(
        data_dir=os.path.abspath(os.path.dirname(path) or "."),
        metrics_listen=STANDALONE_METRICS_LISTEN,
    )
    errors: list[tuple[int, str]] = []

    def error(line: int, msg: str) -> None:
        errors.append((line, f"{path}:{line}: {msg}"))

    for key, msg in apply_settings(settings, doc, skip={"rule", "shards"}):
        error(loc.top_key(key), msg)
    if "shards" in doc:
        try:
            settings.shards = SETTING_BOUNDS["shards"].check(
                doc["shards"], "shards", "validation.config"
            )
        except PortunusError as exc:
            error(loc.top_key("shards"), exc.message)
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        error(loc.top_key("rule"), "rule must be an array of tables: write [[rule]]")
        raw_rules = []
    rules: list[Rule] = []
    seen_names: dict[str, int] = {}
    for i, table in enumerate(raw_rules):
        if not isinstance(table, dict):
            error(loc.rule_key(i, None), "rule must be an array of tables: write [[rule]]")
            continue
        rule, errs = rule_from_table(table, settings.range_rule_max_ports)
        for rule_key, msg in errs:
            error(loc.rule_key(i, rule_key), msg)
        if rule is None:
            continue
        if rule.id in seen_names:
            error(
                loc.rule_key(i, "name"),
                f"duplicate rule name {rule.id!r} (first at rule #{seen_names[rule.id] + 1})",
            )
            continue
        seen_names[rule.id] = i
        rules.append(rule)
    # Port slots: overlapping ports on one protocol conflict, except SNI rules sharing a port.
    for i, a in enumerate(rules):
        for b in rules[:i]:
            if (
                a.protocol != b.protocol
                or a.listen_end < b.listen_start
                or b.listen_end < a.listen_start
            ):
                continue
            both_single = not a.is_range and not b.is_range
            if both_single and (a.sni or b.sni):
                if a.sni is None and b.sni is None:
                    pass  # two fallbacks: conflict below
                elif a.sni is not None and a.sni == b.sni:
                    pass
                else:
                    continue
            idx = raw_rules.index(next(t for t in raw_rules if t.get("name") == a.id))
            error(
                loc.rule_key(
                    idx, "listen_port" if "listen_port" in raw_rules[idx] else "listen_ports"
                ),
                f"port_conflict: rule {a.id!r} overlaps the ports of rule {b.id!r} on {a.protocol}",
            )
    if errors:
        raise ConfigError(_in_line_order(errors))
    settings.runtime_dir = os.environ.get("PORTUNUS_RUNTIME_DIR") or ""
    return settings, rules
