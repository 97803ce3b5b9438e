"""Restart backoff of supervised children: immediate first restart, exponential
with jitter after, capped — and still capped after thousands of crashes in a row."""

from __future__ import annotations

from portunus.supervisor.children import BACKOFF_MAX, STABLE_SECS, Child
from portunus.supervisor.policy import Role


def _child() -> Child:
    return Child(
        name="shard-0", title="portunus: shard 0", entry=lambda sock: None, role=Role.SHARD
    )


def test_first_restart_is_immediate_then_grows() -> None:
    c = _child()
    now = 1000.0
    delays = []
    for _ in range(6):
        c.started_at = now  # crashed right after start
        delays.append(c.schedule_restart(now))
    assert delays[0] == 0.0
    assert 0 < delays[1] < delays[3] < delays[5] <= BACKOFF_MAX * 1.2


def test_a_stable_run_resets_the_backoff() -> None:
    c = _child()
    for _ in range(5):
        c.schedule_restart(0.0)
    c.started_at = 0.0
    assert c.schedule_restart(STABLE_SECS + 1) == 0.0


def test_thousands_of_crashes_do_not_overflow() -> None:
    c = _child()
    for _ in range(3000):
        d = c.schedule_restart(0.0)
    assert 0 < d <= BACKOFF_MAX * 1.2
