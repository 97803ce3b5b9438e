"""The owner envelope (portunus.shard.owner_limits): pacing by two buckets, the
tighter winning; admission by both layers with nothing leaked on a refusal; and
runtimes re-pointed when an owner's caps change (hot update, lift, re-set)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from portunus.rules import Rule, Target, build_rule
from portunus.shard.owner_limits import OwnerLimits, Pacer, PairSlot, admit_both, count_open
from portunus.shard.ratelimit import REFUSED, RuleLimits, SharedCells, TokenBucket, bandwidth_shape
from portunus.shard.runtime import RuleRuntime, ShardContext

MB = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, secs: float) -> None:
        self.ns += int(secs * 1e9)


def bucket(clock: Clock, rate: int, burst: int) -> TokenBucket:
    b, chunk = bandwidth_shape(rate, burst)
    return TokenBucket(SharedCells(None), 0, rate, b, chunk, clock=clock)


def drain(pacer: Pacer, clock: Clock, secs: float, step: float = 0.001) -> int:
    """Bytes the pacer lets through in ``secs`` of fake time, read as fast as allowed."""
    got = 0
    end = clock.ns + int(secs * 1e9)
    while clock.ns < end:
        n, _wait = pacer.grant(256 * 1024)
        got += n
        clock.advance(step)
    return got


def test_the_tighter_bucket_wins_either_way() -> None:
    clock = Clock()
    rule = SimpleNamespace(bw_in=bucket(clock, 4 * MB, 64 * 1024), bw_out=None)
    owner = SimpleNamespace(bw_in=bucket(clock, 1 * MB, 64 * 1024), bw_out=None)
    pacer = Pacer(rule, owner, "bw_in")  # type: ignore[arg-type]
    got = drain(pacer, clock, 10.0)
    assert abs(got - (10 * MB + 64 * 1024)) <= 64 * 1024  # the owner's 1 MB/s, plus its burst
    # The rule's bucket was refunded what the owner refused: it is not drained at 1 MB/s.
    owner.bw_in = bucket(clock, 8 * MB, 64 * 1024)
    got = drain(pacer, clock, 10.0)
    assert abs(got - 40 * MB) <= 2 * 64 * 1024  # now the rule's 4 MB/s is the tighter


def test_a_pacer_follows_changes_of_the_holders() -> None:
    clock = Clock()
    owner = SimpleNamespace(bw_in=None, bw_out=None)
    pacer = Pacer(None, owner, "bw_in")  # type: ignore[arg-type]
    assert pacer.grant(1000) == (1000, 0.0)  # nothing capped: everything passes
    owner.bw_in = bucket(clock, 1 * MB, 64 * 1024)
    assert abs(drain(pacer, clock, 2.0) - (2 * MB + 64 * 1024)) <= 64 * 1024
    owner.bw_in = None  # lifted
    assert pacer.grant(5000) == (5000, 0.0)


def test_try_take_is_all_or_nothing_over_both() -> None:
    clock = Clock()
    rule = SimpleNamespace(bw_out=bucket(clock, 1000, 1000))
    owner = SimpleNamespace(bw_out=bucket(clock, 1000, 500))
    pacer = Pacer(rule, owner, "bw_out")  # type: ignore[arg-type]
    assert pacer.try_take(400)
    assert not pacer.try_take(400)  # the owner has 100 left; the rule gets its 400 back
    owner.bw_out = None
    assert pacer.try_take(600)  # 600 of the rule's 1000 were never spent


@pytest.fixture
def settings(tmp_path: Path) -> dict[str, Any]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return {"runtime_dir": str(run), "shards": 2}


def test_admission_by_both_layers_leaks_nothing(settings: dict[str, Any]) -> None:
    rule = RuleLimits(settings, "local", "o1", ("local", "o1", "alice"))
    rule.configure({"concurrent_connections": 5})
    owner = OwnerLimits(settings, "alice")
    owner.configure({"concurrent_connections": 2})
    labels = ("local", "o1", "alice")
    before = REFUSED.labels(*labels, "owner_concurrent")._value.get()
    slots = []
    for _ in range(2):
        ok, slot = admit_both(rule, owner, labels)
        assert ok and isinstance(slot, PairSlot)
        slots.append(slot)
    assert admit_both(rule, owner, labels) == (False, None)
    assert REFUSED.labels(*labels, "owner_concurrent")._value.get() == before + 1
    assert (
        rule.concurrent is not None and rule.concurrent.total() == 2
    )  # the refused one gave its slot back
    slots.pop().release()
    assert owner.concurrent is not None and owner.concurrent.total() == 1
    assert admit_both(rule, owner, labels)[0]
    # A refusal by the rule takes nothing from the owner.
    rule.configure({"concurrent_connections": 2})
    owner.configure({"concurrent_connections": 10})
    taken = owner.concurrent.total()
    assert admit_both(rule, owner, labels) == (False, None)
    assert owner.concurrent.total() == taken
    rule.close()
    owner.close()


def test_owner_new_connection_refusal_refunds_the_rule(settings: dict[str, Any]) -> None:
    rule = RuleLimits(settings, "local", "o2", ("local", "o2", "bob"))
    rule.configure({"new_connections_per_sec": 3})
    owner = OwnerLimits(settings, "bob")
    owner.configure({"new_connections_per_sec": 1})
    labels = ("local", "o2", "bob")
    assert admit_both(rule, owner, labels)[0]
    assert not admit_both(rule, owner, labels)[0]  # owner_new_connections
    owner.configure(None)
    # The rule still has 2 of its burst of 3: the owner's refusal cost it nothing.
    assert [admit_both(rule, owner, labels)[0] for _ in range(3)] == [True, True, False]
    rule.close()
    owner.close()


# ------------------------------------------------------------------ runtimes


@pytest.fixture
def ctx(settings: dict[str, Any]) -> Iterator[ShardContext]:
    loop = asyncio.new_event_loop()
    c = ShardContext(loop, settings)
    yield c
    c.owners.close()
    loop.close()


def rule(rid: str, owner: str = "", rate_limit: dict[str, Any] | None = None) -> Rule:
    return build_rule(
        id=rid,
        protocol="tcp",
        listen=(40000, 40000),
        targets=[Target("127.0.0.1", 40001)],
        owner=owner,
        rate_limit=rate_limit,
    )


def test_an_uncapped_owner_keeps_the_fast_path(ctx: ShardContext) -> None:
    rt = RuleRuntime(ctx, rule("f1", owner="carol"))
    assert rt.limiter_in is None and rt.limiter_out is None and rt.owner_gate is None
    assert rt.admit() and rt.slot is None
    # Only a connection cap: still no pacing (splice), but admission goes through the owner.
    ctx.owners.replace({"carol": {"concurrent_connections": 1}})
    rt.refresh_limits()
    assert rt.limiter_in is None and rt.limiter_out is None and rt.owner_gate is not None
    assert rt.admit() and rt.slot is not None
    assert not rt.admit()
    rt.stop()


def test_owner_caps_change_under_open_pacers(ctx: ShardContext) -> None:
    a = RuleRuntime(ctx, rule("h1", owner="dave"))
    b = RuleRuntime(ctx, rule("h2", owner="dave", rate_limit={"bandwidth_out_bps": 3 * MB}))
    # An uncapped owner: the rule's own bucket, through a pacer a later owner cap reaches.
    assert isinstance(b.limiter_out, Pacer) and b.limiter_out._buckets()[1] is None
    held_out = b.limiter_out
    changed = ctx.owners.replace({"dave": {"bandwidth_in_bps": 2 * MB}})
    assert (
        set(changed) == {"dave"} and changed["dave"] is None
    )  # no connection cap: nothing to count
    for rt in (a, b):
        rt.refresh_limits()
    assert isinstance(a.limiter_in, Pacer) and a.limiter_out is None
    assert isinstance(b.limiter_in, Pacer) and isinstance(b.limiter_out, Pacer)
    held = a.limiter_in  # what an open connection's pump holds
    owner = ctx.owners.get("dave")
    assert owner is b.limiter_in.owner  # one envelope for both rules
    assert held._buckets()[1] is not None and held._buckets()[1].rate == 2 * MB
    assert held_out._buckets()[1] is None  # the owner caps bytes in only
    ctx.owners.replace({"dave": {"bandwidth_in_bps": 2 * MB, "bandwidth_out_bps": MB}})
    assert held_out._buckets()[1] is not None  # added: the open connection of b is inside it now
    assert set(ctx.owners.replace({"dave": {"bandwidth_in_bps": 5 * MB}})) == {"dave"}
    assert held._buckets()[1].rate == 5 * MB  # changed in place: the open pump sees it
    assert set(ctx.owners.replace({})) == {"dave"}
    assert held.grant(10_000) == (10_000, 0.0)  # lifted
    ctx.owners.replace({"dave": {"bandwidth_in_bps": 1 * MB}})
    assert held._buckets()[1] is not None  # set again: the same holder fills up
    assert ctx.owners.replace({"dave": {"bandwidth_in_bps": 1 * MB}}) == {}  # unchanged
    a.refresh_limits()
    ctx.owners.replace({})
    a.refresh_limits()
    assert a.limiter_in is None  # new connections of the uncapped rule splice again
    a.stop()
    b.stop()


def test_a_rule_without_owner_is_never_paced_by_an_owner(ctx: ShardContext) -> None:
    ctx.owners.replace({"erin": {"bandwidth_in_bps": MB, "concurrent_connections": 1}})
    rt = RuleRuntime(ctx, rule("n1"))
    assert rt.owner_limits is None and rt.limiter_in is None
    assert rt.admit() and rt.admit()
    capped = RuleRuntime(ctx, rule("n2", rate_limit={"bandwidth_in_bps": MB}))
    assert isinstance(capped.limiter_in, TokenBucket)  # no owner: the rule's own bucket, as before
    capped.stop()


def test_runtime_made_after_the_caps_starts_inside_them(ctx: ShardContext) -> None:
    ctx.owners.replace({"fay": {"bandwidth_out_bps": MB}})
    rt = RuleRuntime(ctx, rule("s1", owner="fay"))
    assert rt.limiter_in is None and isinstance(rt.limiter_out, Pacer) and rt.sweep is not None
    rt.stop()
    assert rt.sweep is None


class Conn:
    """What count_open touches on a connection or flow."""

    def __init__(self, slot: Any) -> None:
        self.closed = False
        self.slot = slot


def test_a_new_connection_cap_counts_the_open_connections(ctx: ShardContext) -> None:
    """Set while 3 connections are open, a cap of 2 admits nothing until two have
    closed; the open ones release into it (no slot leaks, none counted twice)."""
    rt = RuleRuntime(ctx, rule("c1", owner="gus", rate_limit={"concurrent_connections": 10}))
    open_conns = []
    for _ in range(3):
        assert rt.admit()
        open_conns.append(Conn(rt.slot))
    rt.conns.update(open_conns)
    changed = ctx.owners.replace({"gus": {"concurrent_connections": 2}})
    budget = changed["gus"]
    assert budget is not None
    count_open(rt.conns, budget)
    rt.refresh_limits()
    assert budget.total() == 3
    assert all(isinstance(c.slot, PairSlot) for c in open_conns)
    assert not rt.admit()
    open_conns.pop().slot.release()
    assert budget.total() == 2 and not rt.admit()
    open_conns.pop().slot.release()
    assert rt.admit() and budget.total() == 2
    rt.slot.release()
    open_conns.pop().slot.release()
    assert budget.total() == 0
    assert rt.limits.concurrent.total() == 0  # the rule's own count came back to zero too
    # Changing the cap keeps the same count: nothing to add.
    assert ctx.owners.replace({"gus": {"concurrent_connections": 5}}) == {"gus": None}
    rt.stop()
