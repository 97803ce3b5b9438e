"""How a shard's rule runtimes hold rate limits: admission slots, updates that
keep one set of limiters per rule, and release when replaced or drained."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portunus.rules import Rule, Target, build_rule
from portunus.shard import ratelimit as rl
from portunus.shard.runtime import RuleRuntime, ShardContext


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ShardContext]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    loop = asyncio.new_event_loop()
    yield ShardContext(loop, {"runtime_dir": str(run), "shards": 2})
    loop.close()


def rule(rate_limit: dict[str, Any] | None, rid: str = "rt1") -> Rule:
    return build_rule(
        id=rid,
        protocol="tcp",
        listen=(40000, 40000),
        targets=[Target("127.0.0.1", 40001)],
        rate_limit=rate_limit,
    )


def test_no_rate_limit_costs_nothing(ctx: ShardContext) -> None:
    rt = RuleRuntime(ctx, rule(None))
    assert rt.limits is None and rt.limiter_in is None and rt.sweep is None
    assert rt.admit() and rt.slot is None
    rt.draining = True
    assert not rt.admit()


def test_admission_slots_and_release(ctx: ShardContext) -> None:
    rt = RuleRuntime(ctx, rule({"concurrent_connections": 2}))
    taken = []
    for _ in range(2):
        assert rt.admit()
        assert rt.slot is not None
        taken.append(rt.slot)
    assert not rt.admit() and rt.slot is None
    taken.pop().release()
    assert rt.admit()
    rt.stop()
    assert rt.limits is None and ("local", "rt1") not in rl._LIMITS


def test_update_keeps_one_set_of_limiters(ctx: ShardContext) -> None:
    old = RuleRuntime(ctx, rule({"bandwidth_in_bps": 1_000_000}))
    bucket = old.limiter_in
    assert bucket is not None and old.limiter_out is None and old.sweep is not None
    new = RuleRuntime(ctx, rule({"bandwidth_in_bps": 3_000_000, "bandwidth_out_bps": 500_000}))
    assert new.limiter_in is bucket and bucket.rate == 3_000_000  # open pumps see the new rate
    assert new.limiter_out is not None
    old.stop()  # replaced: gives its reference back, the rule keeps its limiters
    assert bucket.limited and old.sweep is None
    new.stop()
    assert not bucket.limited  # nothing holds the rule any more: open pumps run free
    assert ("local", "rt1") not in rl._LIMITS


def test_a_draining_rule_keeps_pacing_until_drained(ctx: ShardContext) -> None:
    rt = RuleRuntime(ctx, rule({"bandwidth_out_bps": 1_000_000}))
    bucket = rt.limiter_out
    assert bucket is not None
    rt.conns.add(object())  # an open connection
    rt.draining = True
    rt.stop()
    assert rt.limits is not None and bucket.limited
    rt.conns.clear()
    ctx.rule_drained(rt)
    assert rt.limits is None and not bucket.limited
