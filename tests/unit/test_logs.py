"""LogThrottle: per-event caps with one summary line for what was held back."""

from __future__ import annotations

import json

import pytest

from portunus import logs
from portunus.logs import LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(capfd: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def json_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(logs._state, "format", "json")
    monkeypatch.setitem(logs._state, "level", 10)


def test_allows_limit_per_window_then_summarizes_on_the_next_window(
    capfd: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    t = LogThrottle(limit=3, window=1.0, clock=clock)
    assert [t.allow("tcp.connect_failed", "warning") for _ in range(10)] == [True] * 3 + [False] * 7
    assert lines(capfd) == []
    clock.now += 1.0
    assert t.allow("tcp.connect_failed", "warning")
    (summary,) = lines(capfd)
    assert summary["event"] == "log.suppressed" and summary["level"] == "warning"
    assert (summary["suppressed_event"], summary["count"]) == ("tcp.connect_failed", 7)
    # The new window counts from zero again.
    assert [t.allow("tcp.connect_failed") for _ in range(3)] == [True, True, False]


def test_events_are_limited_independently(capfd: pytest.CaptureFixture[str]) -> None:
    t = LogThrottle(limit=1, window=1.0, clock=Clock())
    assert t.allow("a") and not t.allow("a")
    assert t.allow("b") and not t.allow("b")
    assert lines(capfd) == []


def test_flush_reports_a_flood_that_stopped_and_stays_quiet_otherwise(
    capfd: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    t = LogThrottle(limit=2, window=1.0, clock=clock)
    for _ in range(5):
        t.allow("tcp.socket_failed", "error")
    t.allow("quiet")
    t.flush()  # the window has not ended yet: nothing to say
    assert lines(capfd) == []
    clock.now += 1.5
    t.flush()
    (summary,) = lines(capfd)
    assert (summary["suppressed_event"], summary["count"], summary["level"]) == (
        "tcp.socket_failed",
        3,
        "error",
    )
    t.flush()
    assert lines(capfd) == []
    assert t.allow("tcp.socket_failed") and t.allow("tcp.socket_failed")


def test_log_throttled_writes_through_the_shared_throttle(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    monkeypatch.setattr(logs, "_THROTTLE", LogThrottle(limit=2, window=1.0, clock=clock))
    for i in range(50):
        logs.log_throttled("tcp.connect_failed", level="warning", n=i)
    got = lines(capfd)
    assert [(r["event"], r["n"]) for r in got] == [
        ("tcp.connect_failed", 0),
        ("tcp.connect_failed", 1),
    ]
    clock.now += 1.0
    logs.flush_throttled()
    (summary,) = lines(capfd)
    assert summary["count"] == 48
