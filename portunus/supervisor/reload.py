"""Reloading settings on SIGHUP without restarting any process.

The supervisor re-reads the configuration file and validates all of it first: an
invalid file changes nothing and is logged as ``config.invalid`` with every
``file:line: reason``.  Of a valid file, the keys in ``RELOADABLE`` take effect at
once: the supervisor applies them to itself and sends them to every child over
its channel (shards get a fresh ``config`` frame; control and web a ``settings``
frame), and each child updates its live ``Settings`` object, which its code reads
at use time.  Any other changed key needs a restart and is logged once as
``config.restart_required`` naming the keys; its old value stays in force.

A key is only listed as reloadable once every process that uses it reads it at use
time (or is told, like the UDP flow sweeper): a key added later is "restart
required" until someone checks that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from portunus import logs
from portunus.config import ConfigError, Settings
from portunus.logs import log_event

RELOADABLE = frozenset(
    {
        "log_format",
        "log_level",
        "shutdown_drain_timeout_secs",
        "range_rule_max_ports",
        "udp_flow_idle_secs",
        "udp_max_flows",
        "connect_timeout_secs",
        "ack_timeout_secs",
        "stats_stream_interval_secs",
        "sni_client_hello_timeout_secs",
    }
)
# Not settings of the file: where it lives, derived paths, the CLI's --shards.
_NOT_KEYS = frozenset({"data_dir", "runtime_dir", "config_path", "shards", "extra"})


def diff(old: Settings, new: Settings) -> tuple[dict[str, Any], list[str]]:
    """``(reloadable changes {key: new value}, keys that changed but need a restart)``."""
    changed: dict[str, Any] = {}
    restart: list[str] = []
    for f in fields(Settings):
        if f.name in _NOT_KEYS:
            continue
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        if f.name in RELOADABLE:
            changed[f.name] = after
        else:
            restart.append(f.name)
    return changed, sorted(restart)


def apply_settings(settings: Settings, changed: dict[str, Any]) -> None:
    """Apply reloadable ``changed`` keys to a live Settings (any process) and to
    this process's logging; unknown or non-reloadable keys are ignored."""
    for key, value in changed.items():
        if key in RELOADABLE and hasattr(settings, key):
            setattr(settings, key, value)
    if "log_format" in changed or "log_level" in changed:
        logs.configure(fmt=changed.get("log_format"), level=changed.get("log_level"))


class SettingsReloader:
    """Holds the live settings of the service and reloads them from ``read``."""

    def __init__(self, current: Settings, read: Callable[[], Settings], path: str) -> None:
        self.current = current
        self.read = read
        self.path = path

    def reload(self, *, log_outcome: bool = True) -> dict[str, Any] | None:
        """Re-read and validate; returns the reloadable changes (maybe empty) that
        were applied here, or None when the file is invalid (nothing changed)."""
        try:
            new = self.read()
        except ConfigError as exc:
            if log_outcome:
                log_event(
                    "config.invalid",
                    level="error",
                    path=self.path,
                    errors=exc.errors,
                    hint="fix the file and reload again; nothing was changed",
                )
            return None
        changed, restart = diff(self.current, new)
        apply_settings(self.current, changed)
        if restart:
            log_event(
                "config.restart_required",
                level="warning",
                path=self.path,
                keys=restart,
                hint="these keys keep their old value until the service is restarted",
            )
        if log_outcome:
            log_event(
                "config.reloaded", path=self.path, changed=sorted(changed), restart_required=restart
            )
        return changed
