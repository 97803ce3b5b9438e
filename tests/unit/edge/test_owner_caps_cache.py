"""The edge client's copy of its owner caps: checked like the server checks them,
kept in rules.json next to the rules, forgotten with them."""

from __future__ import annotations

import json
from pathlib import Path

from portunus.edge.rulestore import RuleStore, check_owner_caps

CAPS = {"alice": {"bandwidth_in_bps": 1000, "concurrent_connections": 3}}


def test_bad_entries_are_dropped_not_fatal() -> None:
    raw = {
        **CAPS,
        "bob": {"bandwidth_in_bps": 0},
        "carol": {"nope": 1},
        "dave": "x",
        "": {"bandwidth_in_bps": 5},
        "erin": {},
    }
    assert check_owner_caps(raw) == CAPS
    assert check_owner_caps(None) == {} and check_owner_caps([1]) == {}


def test_kept_with_the_rules_and_cleared_with_them(tmp_path: Path) -> None:
    store = RuleStore(str(tmp_path), "client-1")
    store.replace([])
    store.set_owner_caps(CAPS)
    saved = json.loads((tmp_path / "rules.json").read_text())
    assert saved["owner_caps"] == CAPS and saved["rules"] == []
    again = RuleStore(str(tmp_path), "client-1")
    again.load()
    assert again.owner_caps == CAPS
    other = RuleStore(str(tmp_path), "client-2")  # a file written for another client id
    other.load()
    assert other.owner_caps == {}
    again.clear()
    assert again.owner_caps == {} and not (tmp_path / "rules.json").exists()
