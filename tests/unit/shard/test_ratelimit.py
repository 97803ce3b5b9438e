"""Token-bucket math and cross-process sharing of portunus.shard.ratelimit.

Most tests drive the buckets with a fake clock (nanoseconds), so the arithmetic
is checked exactly; two ``SharedCells`` on one file stand in for two shards (flock
treats two opens of a file as two holders, as it does two processes).  One test
forks real processes against the real clock.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from portunus.shard import ratelimit as rl
from portunus.shard import udp_budget
from portunus.shard.ratelimit import (
    CELL_CONN,
    CELL_IN,
    CELL_OUT,
    RuleLimits,
    SharedCells,
    TokenBucket,
    bandwidth_shape,
    connection_shape,
)

MB = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, secs: float) -> None:
        self.ns += int(secs * 1e9)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cells_path(tmp_path: Path) -> str:
    return str(tmp_path / "rule.rl")


def bucket(
    cells: SharedCells, clock: Clock, rate: int, burst: int | None = None, cell: int = CELL_IN
) -> TokenBucket:
    b, chunk = bandwidth_shape(rate, burst)
    return TokenBucket(cells, cell, rate, b, chunk, clock=clock)


def drain(b: TokenBucket, clock: Clock, secs: float, step: int = 256 * 1024) -> int:
    """A greedy reader for ``secs`` of fake time: reads whenever granted, sleeps
    exactly as long as told.  Returns the bytes it was granted."""
    total = 0
    end = clock.ns + int(secs * 1e9)
    while clock.ns < end:
        n, wait = b.grant(step)
        if n:
            total += n
        else:
            assert wait > 0
            clock.advance(min(wait, (end - clock.ns) / 1e9 + 1e-9))
    return total


# ------------------------------------------------------------------ shapes


def test_default_shapes() -> None:
    burst, chunk = bandwidth_shape(4 * MB, None)
    assert burst == 4 * MB // 20  # 50 ms: a 5 s transfer gains 1 %, not 20 %
    assert chunk == 4 * MB // 50
    burst, chunk = bandwidth_shape(100_000, None)
    assert burst == 64 * 1024  # a whole UDP datagram always fits
    assert chunk == 2000
    burst, chunk = bandwidth_shape(4 * MB, 1000)
    assert (burst, chunk) == (1000, 500)  # an explicit small burst bounds the chunk
    burst, chunk = bandwidth_shape(10**10, None)
    assert chunk == rl.MAX_CHUNK
    assert connection_shape(5, None) == (5, 1)
    assert connection_shape(5, 2) == (2, 1)


# ------------------------------------------------------------------ one bucket


def test_starts_full_then_paces_at_rate(cells_path: str, clock: Clock) -> None:
    cells = SharedCells(cells_path)
    b = bucket(cells, clock, 4 * MB)
    burst, chunk = bandwidth_shape(4 * MB, None)
    # The full burst is there at once, handed out a chunk at a time.
    got = 0
    while True:
        n, wait = b.grant(10 * MB)
        if not n:
            break
        assert n <= chunk
        got += n
    # Whole chunks only: what is left (< a chunk) stays in the bucket.
    assert got == pytest.approx(burst // chunk * chunk, abs=1)
    # Empty: told to wait for one chunk's worth of rate.
    assert wait == pytest.approx((chunk - burst % chunk) / (4 * MB), rel=1e-6)
    clock.advance(wait / 2)
    n, again = b.grant(10)
    assert n == 0 and again == pytest.approx(wait / 2, rel=1e-6)
    clock.advance(again)
    n, _ = b.grant(10 * MB)
    assert n == pytest.approx(chunk, abs=1)
    cells.close()


@pytest.mark.parametrize("rate", [50_000, 4 * MB, 100 * MB])
def test_long_run_rate_is_exact(cells_path: str, clock: Clock, rate: int) -> None:
    cells = SharedCells(cells_path)
    b = bucket(cells, clock, rate)
    burst, chunk = bandwidth_shape(rate, None)
    total = drain(b, clock, 10.0)
    expected = burst + rate * 10.0
    assert abs(total - expected) <= chunk + 1, (total, expected)
    cells.close()


def test_idle_bucket_saves_only_the_burst(cells_path: str, clock: Clock) -> None:
    cells = SharedCells(cells_path)
    b = bucket(cells, clock, 4 * MB)
    drain(b, clock, 1.0)
    clock.advance(30.0)  # idle: the bucket refills, but only up to the burst
    b.local = 0
    burst, chunk = bandwidth_shape(4 * MB, None)
    got = 0
    while n := b.grant(10 * MB)[0]:
        got += n
    assert got == pytest.approx(burst // chunk * chunk, abs=1)
    cells.close()


def test_refund_is_kept_for_the_next_read(cells_path: str, clock: Clock) -> None:
    cells = SharedCells(cells_path)
    b = bucket(cells, clock, 4 * MB, burst=1000)
    n, _ = b.grant(600)
    assert n == 500  # one chunk (burst // 2)
    b.refund(200)
    n, _ = b.grant(600)
    assert n == 200
    n, _ = b.grant(600)
    assert n == 500  # the rest of the burst
    assert b.grant(600)[0] == 0
    cells.close()


def test_try_take_is_all_or_nothing(cells_path: str, clock: Clock) -> None:
    cells = SharedCells(cells_path)
    b = bucket(cells, clock, 100_000, burst=10_000)
    assert b.try_take(6000)
    assert not b.try_take(6000)  # 4000 left: nothing is taken
    assert b.try_take(4000)
    assert not b.try_take(10_001)  # larger than the burst: never
    clock.advance(1.0)
    assert not b.try_take(10_001)
    assert b.try_take(10_000)
    cells.close()


def test_connection_bucket(cells_path: str, clock: Clock) -> None:
    cells = SharedCells(cells_path)
    burst, chunk = connection_shape(5, None)
    b = TokenBucket(cells, CELL_CONN, 5, burst, chunk, clock=clock)
    assert [b.try_take() for _ in range(6)] == [True] * 5 + [False]
    clock.advance(0.1)
    assert not b.try_take()  # 0.5 of a token
    clock.advance(0.1)
    assert b.try_take()
    assert not b.try_take()
    cells.close()


def test_reconfigure_and_detach(cells_path: str, clock: Clock) -> None:
    cells = SharedCells(cells_path)
    b = bucket(cells, clock, 1 * MB)
    drain(b, clock, 0.5)
    burst, chunk = bandwidth_shape(8 * MB, None)
    b.configure(8 * MB, burst, chunk)
    start = clock.ns
    total = drain(b, clock, 2.0)
    assert total == pytest.approx(8 * MB * (clock.ns - start) / 1e9, rel=0.02)
    b.detach()
    assert not b.limited
    assert b.grant(10**9) == (10**9, 0.0)
    assert b.try_take(10**9)
    cells.close()


def test_cells_are_independent(cells_path: str, clock: Clock) -> None:
    cells = SharedCells(cells_path)
    a = bucket(cells, clock, 1 * MB, burst=100_000, cell=CELL_IN)
    b = bucket(cells, clock, 1 * MB, burst=100_000, cell=CELL_OUT)
    assert a.try_take(100_000)
    assert not a.try_take(1)
    assert b.try_take(100_000)
    cells.close()


# ------------------------------------------------------------------ two shards


def test_two_holders_share_one_cap(cells_path: str, clock: Clock) -> None:
    """Two opens of the file (two shards) drawing in turn get one cap between them."""
    one, two = SharedCells(cells_path), SharedCells(cells_path)
    rate = 4 * MB
    a, b = bucket(one, clock, rate), bucket(two, clock, rate)
    burst, chunk = bandwidth_shape(rate, None)
    got = {id(a): 0, id(b): 0}
    end = clock.ns + 10 * 10**9
    order = random.Random(3)
    while clock.ns < end:
        waits = []
        for x in order.sample((a, b), 2):  # who wakes first varies, as with real timers
            n, wait = x.grant(256 * 1024)
            got[id(x)] += n
            if not n:
                waits.append(wait)
        if len(waits) == 2:
            clock.advance(min(waits))
    total = sum(got.values())
    assert abs(total - (burst + rate * 10)) <= 2 * chunk
    assert min(got.values()) > 0.4 * total  # both were served, neither starved
    one.close()
    two.close()


def test_a_locked_file_means_wait_not_overdraw(cells_path: str, clock: Clock) -> None:
    one, two = SharedCells(cells_path), SharedCells(cells_path)
    b = bucket(one, clock, 4 * MB)
    assert two.lock()
    try:
        assert b.grant(1000) == (0, rl.MIN_WAIT)
        assert not b.try_take(1)
    finally:
        two.unlock()

    assert b.grant(1000)[0] == 1000
    one.close()
    two.close()


def _hammer(path: str, rate: int, secs: float, out: str) -> None:
    cells = SharedCells(path)
    burst, chunk = bandwidth_shape(rate, None)
    b = TokenBucket(cells, CELL_IN, rate, burst, chunk)
    total = 0
    end = time.monotonic() + secs
    while time.monotonic() < end:
        n, wait = b.grant(256 * 1024)
        if n:
            total += n
        else:
            time.sleep(wait)
    with open(out, "w") as f:
        f.write(str(total))


def test_real_processes_share_one_cap(tmp_path: Path) -> None:
    """Two forked processes on the real clock: together they get one cap (not two)."""
    rate, secs = 2 * MB, 1.5
    path = str(tmp_path / "proc.rl")
    pids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                _hammer(path, rate, secs, str(tmp_path / f"out{i}"))
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    totals = [int((tmp_path / f"out{i}").read_text()) for i in range(2)]
    burst, _ = bandwidth_shape(rate, None)
    expected = burst + rate * secs
    assert 0.9 * expected <= sum(totals) <= 1.03 * expected, (totals, expected)
    assert min(totals) > 0.2 * sum(totals)


# ------------------------------------------------------------------ RuleLimits


def settings_for(tmp_path: Path, shards: int = 2) -> dict[str, object]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    return {"runtime_dir": str(run), "shards": shards}


def test_rule_limits_admission(tmp_path: Path) -> None:
    limits = RuleLimits(settings_for(tmp_path), "local", "r1", ("local", "r1", ""))
    limits.configure({"concurrent_connections": 3})
    assert limits.concurrent is not None and limits.concurrent.shared
    slots = []
    for _ in range(3):
        ok, slot = limits.admit()
        assert ok and slot is limits.concurrent
        slots.append(slot)
    assert limits.admit() == (False, None)
    slots.pop().release()
    ok, slot = limits.admit()
    assert ok
    # New-connection rate: 2/s, burst 2 -> two now, then refused; the refusal
    # gives the live slot back.
    limits.configure({"concurrent_connections": 10, "new_connections_per_sec": 2})
    live = limits.concurrent.total() if limits.concurrent else 0
    assert [limits.admit()[0] for _ in range(3)] == [True, True, False]
    assert limits.concurrent is not None and limits.concurrent.total() == live + 2
    limits.close()


def test_rule_limits_update_in_place_and_lift(tmp_path: Path) -> None:
    limits = RuleLimits(settings_for(tmp_path), "local", "r2", ("local", "r2", ""))
    limits.configure({"bandwidth_in_bps": 1 * MB})
    held = limits.bw_in
    assert held is not None and limits.bw_out is None and held.rate == 1 * MB
    limits.configure({"bandwidth_in_bps": 3 * MB, "bandwidth_out_bps": 2 * MB})
    assert limits.bw_in is held and held.rate == 3 * MB  # open pumps see the new rate
    assert limits.bw_out is not None
    limits.configure({"bandwidth_out_bps": 2 * MB})
    assert limits.bw_in is None and not held.limited  # lifted: open pumps run free
    assert held.grant(10**8) == (10**8, 0.0)
    limits.close()


def test_rule_limits_without_a_private_dir_split_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    limits = RuleLimits({"shards": 4}, "local", "r3", ("local", "r3", ""))
    limits.configure({"bandwidth_in_bps": 4 * MB, "concurrent_connections": 8})
    assert not limits.shared
    assert limits.bw_in is not None and limits.bw_in.rate == 1 * MB
    assert limits.concurrent is not None and limits.concurrent.limit == 2
    limits.close()


def test_registry_refcounts_and_sweeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path)
    flows = Path(str(settings["runtime_dir"])) / "udp-flows"
    flows.mkdir(mode=0o700)
    dead = 2**22 + 12345  # above pid_max's default: no such process
    stale = flows / f"{dead}-0123456789abcdef0123.rl"
    stale.write_bytes(b"\0" * rl.FILE_SIZE)
    monkeypatch.setattr(udp_budget, "_SWEPT", set())
    monkeypatch.setenv("PORTUNUS_SUPERVISOR_PID", str(os.getpid()))
    a = rl.acquire_limits(settings, "local", "r4", ("local", "r4", ""), {"bandwidth_in_bps": MB})
    b = rl.acquire_limits(
        settings, "local", "r4", ("local", "r4", ""), {"bandwidth_in_bps": 2 * MB}
    )
    assert a is b and a.users == 2 and a.bw_in is not None and a.bw_in.rate == 2 * MB
    assert not stale.exists()
    assert any(p.name.endswith(".rl") for p in flows.iterdir())
    bucket_ = a.bw_in
    rl.release_limits(a)
    assert bucket_.limited
    rl.release_limits(b)
    assert not bucket_.limited and ("local", "r4") not in rl._LIMITS
