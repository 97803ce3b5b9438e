"""Reconnect backoff: doubling from 0.5 s to a 30 s cap, jittered, reset on success."""

from __future__ import annotations

import random

from portunus.edge.timing import Backoff, LinkTiming, busy_delay


def test_doubles_to_the_cap_with_bounded_jitter() -> None:
    b = Backoff(0.5, 30.0, random.Random(1))
    delays = [b.next() for _ in range(10)]
    for i, d in enumerate(delays):
        base = min(30.0, 0.5 * 2**i)
        assert base * 0.8 <= d <= min(30.0, base * 1.2)
    assert max(delays) <= 30.0 and delays[-1] >= 24.0


def test_jitter_spreads_a_fleet() -> None:
    firsts = {round(Backoff(0.5, 30.0, random.Random(seed)).next(), 4) for seed in range(20)}
    assert len(firsts) > 10


def test_reset_starts_over() -> None:
    b = Backoff(0.5, 30.0)
    for _ in range(6):
        b.next()
    b.reset()
    assert b.next() <= 0.6


def test_defaults_match_the_protocol() -> None:
    t = LinkTiming()
    assert (t.heartbeat_secs, t.dead_secs, t.stats_secs, t.backoff_first, t.backoff_max) == (
        5,
        15,
        5,
        0.5,
        30,
    )


def test_backoff_survives_a_very_long_outage() -> None:
    """2 ** 1024 overflows a float: after ~1,000 failed connects (hours of server
    outage) the delay must still be the maximum, not an OverflowError."""
    b = Backoff(0.5, 30.0)
    delays = [b.next() for _ in range(2000)]
    assert all(0 < d <= 30.0 * 1.2 for d in delays)


def test_busy_delay_spreads_retry_after() -> None:
    rng = random.Random(3)
    b = Backoff(0.5, 30, random.Random(1))
    delays = [busy_delay(4, b, rng) for _ in range(200)]
    assert all(4.0 <= d < 8.0 for d in delays)
    assert max(delays) - min(delays) > 3.0  # spread over the window, not one wave
    assert b.failures == 0  # the server's answer, not our backoff, sets the wait
    for bad in (None, 0, -1, True, "5", 301):
        first = busy_delay(bad, Backoff(0.5, 30, random.Random(1)), rng)
        assert 0.4 <= first <= 0.6  # falls back to the backoff's first step
