"""portunus.shard.targets: down marks, priority order, health-probe recovery."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from portunus.rules import Target
from portunus.shard.targets import TargetSet, tcp_probe

A = Target("a.test", 80, priority=1)
B = Target("b.test", 80, priority=2)
C = Target("c.test", 80, priority=3)


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def changes() -> list[tuple[Target, bool]]:
    return []


@pytest.fixture
def make_set(clock: Clock, changes: list[tuple[Target, bool]]) -> Callable[..., TargetSet]:
    def make(targets: list[Target]) -> TargetSet:
        return TargetSet(targets, clock=clock, on_change=lambda t, up: changes.append((t, up)))

    return make


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def fail(ts: TargetSet, clock: Clock, target: Target, *offsets: float) -> None:
    base = clock.now
    for off in offsets:
        clock.now = base + off
        ts.report_failure(target)


def test_candidates_follow_priority_and_keep_rule_order_for_ties(make_set) -> None:
    a2 = Target("a2.test", 80, priority=1)
    ts = make_set([C, A, B, a2])
    assert ts.candidates() == [A, a2, B, C]
    assert not ts.any_down


def test_three_failures_within_window_mark_down(make_set, clock, changes) -> None:
    ts = make_set([A, B])
    fail(ts, clock, A, 0, 10)
    assert ts.is_up(A)
    fail(ts, clock, A, 19.9)
    assert not ts.is_up(A) and ts.any_down
    assert ts.candidates() == [B]
    assert changes == [(A, False)]
    ts.report_failure(A)  # already down: no second transition
    assert changes == [(A, False)]


def test_failures_spread_beyond_window_do_not_mark_down(make_set, clock, changes) -> None:
    ts = make_set([A, B])
    fail(ts, clock, A, 0, 20, 30.5, 55)
    assert ts.is_up(A) and changes == []


def test_success_clears_recent_failures(make_set, clock) -> None:
    ts = make_set([A])
    fail(ts, clock, A, 0, 1)
    ts.report_success(A)
    fail(ts, clock, A, 2)
    assert ts.is_up(A)
    fail(ts, clock, A, 3, 4)
    assert not ts.is_up(A)


def test_all_down_returns_every_target_in_priority_order(make_set, clock) -> None:
    ts = make_set([B, C, A])
    for t in (C, A, B):
        fail(ts, clock, t, 0, 1, 2)
    assert ts.candidates() == [A, B, C]
    assert all(not s.up for s in ts.states)


async def test_recovery_needs_consecutive_probe_successes(make_set, clock, changes) -> None:
    ts = make_set([A, B])
    fail(ts, clock, A, 0, 1, 2)
    script = iter([True, False, True, True])
    probed: list[Target] = []

    async def probe(t: Target) -> bool:
        probed.append(t)
        return next(script, True)

    task = asyncio.ensure_future(ts.health_loop(0.01, probe))
    try:
        await wait_for(lambda: ts.is_up(A))
        assert probed[:4] == [A, A, A, A]  # only the down target is probed
        assert len(probed) == 4
        assert changes == [(A, False), (A, True)]
        assert ts.candidates() == [A, B]
        await asyncio.sleep(0.05)
        assert len(probed) == 4  # nothing is down, nothing is probed
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_health_loop_survives_a_raising_probe_and_stops_on_cancel(make_set, clock) -> None:
    ts = make_set([A])
    fail(ts, clock, A, 0, 1, 2)
    calls = 0

    async def probe(t: Target) -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("probe bug")

    task = asyncio.ensure_future(ts.health_loop(0.01, probe))
    await wait_for(lambda: calls >= 3)
    assert not task.done() and not ts.is_up(A)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
def port_holder() -> Iterator[socket.socket]:
    """A bound TCP socket: connects are refused until the test calls listen()."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


async def test_tcp_probe_reflects_a_real_listener(port_holder) -> None:
    port = port_holder.getsockname()[1]
    assert await tcp_probe(["127.0.0.1"], port, 1.0) is False
    port_holder.listen(8)
    assert await tcp_probe(["127.0.0.1"], port, 1.0) is True
    assert await tcp_probe(["::1", "127.0.0.1"], port, 1.0) is True  # falls through
    assert await tcp_probe([], port, 1.0) is False


async def test_health_loop_brings_back_a_target_once_it_listens(
    make_set, clock, changes, port_holder
) -> None:
    port = port_holder.getsockname()[1]
    target = Target("127.0.0.1", port, priority=1)
    backup = Target("127.0.0.2", port, priority=2)
    ts = make_set([target, backup])
    fail(ts, clock, target, 0, 1, 2)
    results: list[bool] = []

    async def probe(t: Target) -> bool:
        ok = await tcp_probe([t.host], t.port, 1.0)
        results.append(ok)
        return ok

    task = asyncio.ensure_future(ts.health_loop(0.02, probe))
    try:
        await wait_for(lambda: len(results) >= 3)
        assert not ts.is_up(target) and not any(results)
        port_holder.listen(8)
        await wait_for(lambda: ts.is_up(target))
        assert results[-2:] == [True, True] and results.count(True) == 2
        assert changes == [(target, False), (target, True)]
        assert ts.candidates() == [target, backup]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_on_change_errors_do_not_break_state(clock) -> None:
    def boom(t: Target, up: bool) -> None:
        raise RuntimeError("callback bug")

    ts = TargetSet([A, B], clock=clock, on_change=boom)
    fail(ts, clock, A, 0, 1, 2)
    assert ts.candidates() == [B]


def test_empty_target_list_is_refused() -> None:
    with pytest.raises(ValueError):
        TargetSet([])
