"""The client's copy of its desired rule set: ``<data-dir>/rules.json``.

The server is the owner of a client's rules, but a client must keep forwarding
while the server is down — including across a restart of the client itself.
So every ``sync``/``apply`` from the server is written here (0600, atomic
rename) before it is handed to the supervisor, and at start the link applies
this file before it even tries to connect.  Rules stay in their wire form
(``Rule.to_wire()``): this file is a cache of what the server sent, not a
second rule model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from portunus.errors import PortunusError
from portunus.fsutil import write_private_json
from portunus.logs import log_event
from portunus.rules import validate_rate_limit
from portunus.text import is_ascii_digits

RULES_FILE = "rules.json"
FILE_VERSION = 1


class RuleStore:
    """Rules by id (wire dicts), for one client id, mirrored to disk on every change."""

    def __init__(self, data_dir: str, client_id: str) -> None:
        self.path = os.path.join(data_dir, RULES_FILE)
        self.client_id = client_id
        self.rules: dict[str, dict[str, Any]] = {}
        self.owner_caps: dict[str, dict[str, int]] = {}  # the server's last ``owner_caps``

    def load(self) -> list[dict[str, Any]]:
        """Read the file at start; a missing, foreign or damaged file means "no rules"
        (logged), never a failure to start."""
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log_event(
                "link.rules_file_unreadable",
                level="warning",
                path=self.path,
                error=str(exc),
                hint="starting with no rules until the server sends them",
            )
            return []
        if not isinstance(raw, dict) or raw.get("client_id") != self.client_id:
            log_event(
                "link.rules_file_ignored",
                level="warning",
                path=self.path,
                reason="written for another client id (a new bundle?)",
            )
            return []
        self.owner_caps = check_owner_caps(raw.get("owner_caps"))
        rules = raw.get("rules")
        if not isinstance(rules, list):
            return []
        self.rules = {str(r["id"]): r for r in rules if isinstance(r, dict) and "id" in r}
        return list(self.rules.values())

    def replace(self, rules: Iterable[dict[str, Any]]) -> None:
        """A full ``sync``: the file becomes exactly this set."""
        self.rules = {str(r["id"]): r for r in rules}
        self.save()

    def apply(self, upsert: Iterable[dict[str, Any]], remove: Iterable[str]) -> None:
        for rid in remove:
            self.rules.pop(str(rid), None)
        for r in upsert:
            self.rules[str(r["id"])] = r
        self.save()

    def set_owner_caps(self, caps: dict[str, dict[str, int]]) -> None:
        self.owner_caps = caps
        self.save()

    def clear(self) -> None:
        """Forget everything (a revoked client must not forward at its next start)."""
        self.rules = {}
        self.owner_caps = {}
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def save(self) -> None:
        try:
            write_private_json(
                self.path,
                {
                    "version": FILE_VERSION,
                    "client_id": self.client_id,
                    "rules": sorted(self.rules.values(), key=_order),
                    "owner_caps": self.owner_caps,
                },
            )
        except OSError as exc:
            # Forwarding goes on; only a restart while the server is down would miss it.
            log_event("link.rules_file_write_failed", level="error", path=self.path, error=str(exc))


def check_owner_caps(raw: Any) -> dict[str, dict[str, int]]:
    """``{owner: rate_limit}`` from the server (or the file) with every entry checked
    the way the server checks a cap; a bad entry is dropped and logged, not fatal."""
    out: dict[str, dict[str, int]] = {}
    for owner, caps in (raw if isinstance(raw, dict) else {}).items():
        try:
            checked = validate_rate_limit(caps) if isinstance(caps, dict) else None
        except PortunusError as exc:
            checked, why = None, exc.message
        else:
            why = "not a caps object"
        if isinstance(owner, str) and owner and checked:
            out[owner] = checked
        else:
            log_event("link.owner_cap_ignored", level="warning", owner=str(owner)[:64], reason=why)
    return out


def _order(rule: dict[str, Any]) -> tuple[int, str]:
    rid = str(rule.get("id"))
    return (int(rid), "") if is_ascii_digits(rid) else (1 << 62, rid)
