"""Traffic history: counter deltas (restarts, first readings), buckets, retention,
the row cap, and the users-see-their-own scoping of traffic.query."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portunus.control.auth import Principal
from portunus.control.store import Store
from portunus.control.store import traffic as db_traffic
from portunus.control.store.rules import insert_rule
from portunus.control.traffic import Reading, TrafficSampler, counter_delta, query, summary
from portunus.errors import PortunusError
from portunus.rules import Rule, Target

T0 = 1_800_000_000.0  # a minute and an hour boundary (divisible by 3600)
ADMIN = Principal(1, "operator", "superadmin", 1)
ALICE = Principal(2, "alice", "user", 2)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(str(tmp_path / "state.db"))
    yield s
    await s.close()


async def _rule(store: Store, port: int, owner: str = "") -> int:
    rule = Rule(
        id="0",
        protocol="tcp",
        listen_start=port,
        listen_end=port,
        targets=(Target("127.0.0.1", 80),),
        owner=owner,
    )
    async with store.write() as db:
        return await insert_rule(db, "local", rule)


class Counters:
    """A scripted counter source: the test sets what the next reading says."""

    def __init__(self) -> None:
        self.now: dict[int, Reading] = {}

    async def __call__(self, rules: Sequence[db_traffic.RuleKey]) -> dict[int, Reading]:
        return {s.rule_id: self.now[s.rule_id] for s in rules if s.rule_id in self.now}


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def test_counter_delta_never_negative() -> None:
    assert counter_delta(100, 150) == 50
    assert counter_delta(100, 100) == 0
    assert counter_delta(1_000_000, 40) == 40  # restarted from zero: count what it has since


@given(st.integers(0, 2**62), st.integers(0, 2**62))
def test_counter_delta_bounded_by_current(previous: int, current: int) -> None:
    d = counter_delta(previous, current)
    assert 0 <= d <= current


async def test_first_reading_is_a_baseline_not_a_spike(store: Store) -> None:
    rid = await _rule(store, 30001)
    counters, clock = Counters(), Clock()
    sampler = TrafficSampler(store, counters, clock=clock)
    counters.now[rid] = (10**12, 10**12, 5000)  # a long-lived rule seen for the first time
    assert await sampler.sample_once() == 0
    clock.t += 10
    counters.now[rid] = (10**12 + 700, 10**12 + 300, 5003)
    assert await sampler.sample_once() == 1
    out = await query(store, ADMIN, {"rule": rid, "from": int(T0), "to": int(T0 + 60)}, now=T0 + 60)
    assert out["resolution"] == "minute"
    assert out["series"] == [{"ts": int(T0), "bytes_in": 700, "bytes_out": 300, "connections": 3}]
    assert sampler.rates[rid] == (70.0, 30.0)


async def test_a_rule_created_between_samples_counts_from_zero(store: Store) -> None:
    """Its counters started with it: traffic before its first sample is not lost."""
    counters, clock = Counters(), Clock()
    sampler = TrafficSampler(store, counters, clock=clock)
    old = await _rule(store, 30020)
    counters.now[old] = (500, 500, 5)
    await sampler.sample_once()  # first sample of this process: a baseline for the old rule
    new = await _rule(store, 30021)
    counters.now[new] = (4000, 1000, 2)  # moved before the sampler ever saw it
    clock.t += 10
    await sampler.sample_once()
    window = {"from": int(T0), "to": int(T0 + 60)}
    got = await query(store, ADMIN, {**window, "rule": new}, now=T0 + 60)
    assert got["series"][0] == {
        "ts": int(T0),
        "bytes_in": 4000,
        "bytes_out": 1000,
        "connections": 2,
    }
    assert (await query(store, ADMIN, {**window, "rule": old}, now=T0 + 60))["series"][0][
        "bytes_in"
    ] == 0


async def test_counter_restart_gives_no_negative_or_spiked_sample(store: Store) -> None:
    rid = await _rule(store, 30002)
    counters, clock = Counters(), Clock()
    sampler = TrafficSampler(store, counters, clock=clock)
    for reading in [(5000, 5000, 50), (6000, 5500, 52), (200, 100, 1), (700, 100, 2)]:
        counters.now[rid] = reading
        await sampler.sample_once()
        clock.t += 10
    out = await query(store, ADMIN, {"rule": rid, "from": int(T0), "to": int(T0 + 60)}, now=T0 + 60)
    # 1000+200+500 in, 500+100+0 out, 2+1+1 connections; nothing negative, no 5000 spike
    assert out["series"] == [{"ts": int(T0), "bytes_in": 1700, "bytes_out": 600, "connections": 4}]


async def test_unknown_reading_keeps_the_baseline(store: Store) -> None:
    """A client offline for a while: no reading, then the counter continues."""
    rid = await _rule(store, 30003)
    counters, clock = Counters(), Clock()
    sampler = TrafficSampler(store, counters, clock=clock)
    counters.now[rid] = (100, 100, 1)
    await sampler.sample_once()
    del counters.now[rid]
    clock.t += 10
    assert await sampler.sample_once() == 0
    counters.now[rid] = (400, 100, 2)
    clock.t += 10
    await sampler.sample_once()
    out = await query(store, ADMIN, {"rule": rid, "from": int(T0), "to": int(T0 + 60)}, now=T0 + 60)
    assert out["series"][0]["bytes_in"] == 300


async def test_buckets_fill_minutes_and_hours_and_gaps_are_zero(store: Store) -> None:
    rid = await _rule(store, 30004)
    async with store.write() as db:
        for minute in (0, 2, 61):
            await db_traffic.add_deltas(
                db, T0 + minute * 60 + 5, [db_traffic.Delta(rid, "local", "", 10, 1, 1)]
            )
    minutes = await query(
        store, ADMIN, {"rule": rid, "from": int(T0), "to": int(T0 + 180)}, now=T0 + 4000
    )
    assert [p["bytes_in"] for p in minutes["series"]] == [10, 0, 10]
    hours = await query(
        store,
        ADMIN,
        {"rule": rid, "from": int(T0), "to": int(T0 + 7200), "resolution": "hour"},
        now=T0 + 7200,
    )
    assert [(p["bytes_in"], p["connections"]) for p in hours["series"]] == [(20, 2), (10, 1)]


async def test_retention_drops_old_minutes_and_keeps_hours(store: Store) -> None:
    rid = await _rule(store, 30005)
    async with store.write() as db:
        await db_traffic.add_deltas(db, T0, [db_traffic.Delta(rid, "local", "", 1, 1, 1)])
        await db_traffic.add_deltas(
            db, T0 + 8 * 86400, [db_traffic.Delta(rid, "local", "", 2, 2, 2)]
        )
        await db_traffic.prune(db, T0 + 8 * 86400)
        async with db.execute(
            "SELECT resolution, bucket FROM traffic ORDER BY resolution, bucket"
        ) as cur:
            rows = [tuple(r) for r in await cur.fetchall()]
    day8 = int(T0 + 8 * 86400)
    assert rows == [(60, day8), (3600, int(T0)), (3600, day8)]
    async with store.write() as db:
        await db_traffic.prune(db, T0 + 91 * 86400)
        async with db.execute("SELECT count(*) FROM traffic") as cur:
            assert (await cur.fetchone())[0] == 1  # only day 8's hour is within 90 days


async def test_row_cap_keeps_the_newest(store: Store) -> None:
    rid = await _rule(store, 30006)
    async with store.write() as db:
        for minute in range(10):
            await db_traffic.add_deltas(
                db, T0 + minute * 60, [db_traffic.Delta(rid, "local", "", 1, 0, 0)]
            )
        await db_traffic.prune(db, T0 + 600, max_rows={60: 4, 3600: 100})
        async with db.execute(
            "SELECT bucket FROM traffic WHERE resolution = 60 ORDER BY bucket"
        ) as cur:
            kept = [r[0] for r in await cur.fetchall()]
    assert kept == [int(T0 + m * 60) for m in range(6, 10)]


async def test_idle_rules_write_no_rows(store: Store) -> None:
    rid = await _rule(store, 30007)
    async with store.write() as db:
        assert (
            await db_traffic.add_deltas(db, T0, [db_traffic.Delta(rid, "local", "", 0, 0, 0)]) == 0
        )
        async with db.execute("SELECT count(*) FROM traffic") as cur:
            assert (await cur.fetchone())[0] == 0


async def test_users_read_only_their_own_traffic(store: Store) -> None:
    mine, theirs = await _rule(store, 30008, owner="alice"), await _rule(store, 30009, owner="bob")
    async with store.write() as db:
        await db_traffic.add_deltas(
            db,
            T0,
            [
                db_traffic.Delta(mine, "local", "alice", 5, 0, 0),
                db_traffic.Delta(theirs, "local", "bob", 7, 0, 0),
            ],
        )
    window = {"from": int(T0), "to": int(T0 + 60)}
    assert (await query(store, ALICE, window, now=T0 + 60))["series"][0]["bytes_in"] == 5
    assert (await query(store, ADMIN, window, now=T0 + 60))["series"][0]["bytes_in"] == 12
    assert (await query(store, ADMIN, {**window, "owner": "bob"}, now=T0 + 60))["series"][0][
        "bytes_in"
    ] == 7
    with pytest.raises(PortunusError) as err:
        await query(store, ALICE, {**window, "owner": "bob"}, now=T0 + 60)
    assert err.value.code == "not_owner"
    # another's rule, by id: refused like every other read of it
    with pytest.raises(PortunusError) as err:
        await query(store, ALICE, {**window, "rule": theirs}, now=T0 + 60)
    assert err.value.code == "not_owner"
    assert (await query(store, ALICE, {**window, "rule": mine}, now=T0 + 60))["series"][0][
        "bytes_in"
    ] == 5


async def test_query_validates_its_inputs(store: Store) -> None:
    for params, code in [
        ({"from": "yesterday-ish"}, "validation.from"),
        ({"from": "1h", "to": "2h"}, "validation.from"),
        ({"resolution": "second"}, "validation.resolution"),
        ({"rule": "abc"}, "validation.rule"),
        ({"from": "60d", "resolution": "minute"}, "validation.range"),
    ]:
        with pytest.raises(PortunusError) as err:
            await query(store, ADMIN, params)
        assert err.value.code == code, params


async def test_summary_top_rules_and_rates(store: Store) -> None:
    a, b = await _rule(store, 30010, owner="alice"), await _rule(store, 30011)
    counters, clock = Counters(), Clock()
    sampler = TrafficSampler(store, counters, clock=clock)
    counters.now = {a: (0, 0, 0), b: (0, 0, 0)}
    await sampler.sample_once()
    clock.t += 10
    counters.now = {a: (100, 0, 1), b: (5000, 5000, 1)}
    await sampler.sample_once()
    out = await summary(store, sampler, ADMIN, {"since": int(T0 - 60)})
    assert [r["rule"] for r in out["top_rules"]] == [b, a]
    assert out["top_rules"][1] == {
        "rule": a,
        "bytes_in": 100,
        "bytes_out": 0,
        "client": "local",
        "protocol": "tcp",
        "listen": "30010",
        "state": "pending",
    }
    assert out["bytes_in_per_sec"] == 510.0
    mine = await summary(store, sampler, ALICE, {"since": int(T0 - 60)})
    assert [r["rule"] for r in mine["top_rules"]] == [a] and mine["bytes_in_per_sec"] == 10.0


@pytest.mark.parametrize("who", [ADMIN, ALICE])
@pytest.mark.parametrize(
    "rule", ["347841757384375150297466535936", str(2**63), "0", "１２", "-1", True]
)
async def test_a_rule_id_sqlite_cannot_hold_is_a_validation_error(
    store: Store, who: Principal, rule: object
) -> None:
    """Found by schemathesis: ?rule= with 30 digits overflowed SQLite's INTEGER (a 500)."""
    with pytest.raises(PortunusError) as err:
        await query(store, who, {"rule": rule, "from": int(T0), "to": int(T0 + 60)}, now=T0 + 60)
    assert err.value.code == "validation.rule"


async def test_the_reader_parses_no_metrics_file_without_a_local_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet server's rules are all remote: their readings come from the clients'
    stats frames, and the shards' files are not parsed every sample."""
    from types import SimpleNamespace

    from portunus.control import stats
    from portunus.control.traffic import counters_reader

    parsed: list[str] = []
    monkeypatch.setattr(stats, "rule_totals", lambda d: parsed.append(d) or {"1": (4, 5, 6)})
    remote = SimpleNamespace(
        stats={"edge": {"2": {"bytes_in": 7, "bytes_out": 8, "connections_total": 9}}},
        connected=lambda cid: True,
    )
    read = counters_reader(str(tmp_path), remote)
    edge = db_traffic.RuleKey(2, "edge", "")
    assert await read([edge]) == {2: (7, 8, 9)}
    assert parsed == []
    local = db_traffic.RuleKey(1, "local", "")
    assert await read([local, edge]) == {1: (4, 5, 6), 2: (7, 8, 9)}
    assert parsed == [str(tmp_path)]
