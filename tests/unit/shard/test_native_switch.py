"""Which relay a shard uses: PORTUNUS_NATIVE, a missing extension, the warning line."""

from __future__ import annotations

import json
import sys

import pytest

from portunus import logs
from portunus.shard import native


def test_native_0_turns_the_native_relay_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTUNUS_NATIVE", "0")
    assert native.load() == (None, None)  # off on purpose: no warning either


def test_missing_extension_falls_back_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTUNUS_NATIVE", raising=False)
    monkeypatch.setitem(sys.modules, "portunus.shard._relay", None)  # import fails
    relay_type, why = native.load()
    assert relay_type is None and why is not None and "_relay" in why


def test_one_warning_line_from_shard_0_only(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(logs._state, "format", "json")
    for index in range(3):
        native.announce(index, "ImportError: no module")
    native.announce(0, None)  # disabled on purpose or loaded: silent
    lines = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    assert [(e["event"], e["level"]) for e in lines] == [("shard.native_unavailable", "warning")]
    assert "PORTUNUS_NATIVE" in lines[0]["message"]
