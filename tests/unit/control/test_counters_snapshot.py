"""The counter snapshot is incremental (control/counters.py, store/rule_journal.py):
it sees what moved, drops what went, and reads no rule row for a rule that did not
change — checked on what it reads from the store, not on time."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from portunus.config import Settings
from portunus.control import counters
from portunus.control.store import Store, rule_journal
from portunus.control.store import rules as rules_db
from portunus.rules import Target, build_rule

ZERO = dict.fromkeys(counters.COUNTED, 0)


class FakeRemote:
    """RemoteLink's surface the counters read: each stats frame is a new dict."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, dict[str, Any]]] = {}
        self.runs: dict[str, str | None] = {}
        self.up: set[str] = set()

    def connected(self, client_id: str) -> bool:
        return client_id in self.up

    def report(self, client_id: str, **per_rule: dict[str, int]) -> None:
        self.stats[client_id] = {rid.lstrip("r"): dict(v) for rid, v in per_rule.items()}


class Reads:
    """Every call of the journal's rule reads, and every SQL statement run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.all = 0
        self.ids: list[list[int]] = []
        self.sql: list[str] = []
        real_all, real_read = rule_journal.read_all, rule_journal.read

        async def read_all(db: Any) -> Any:
            self.all += 1
            return await real_all(db)

        async def read(db: Any, ids: Any) -> Any:
            self.ids.append(sorted(ids))
            return await real_read(db, ids)

        monkeypatch.setattr(rule_journal, "read_all", read_all)
        monkeypatch.setattr(rule_journal, "read", read)

    def rule_rows_read(self) -> list[str]:
        """Statements that read rows of ``rules`` or ``rule_targets`` (the persist's
        ``WHERE EXISTS (SELECT 1 FROM rules WHERE id = ?)`` probes one dirty rule)."""
        return [
            s for s in self.sql if ("FROM rules" in s or "rule_targets" in s) and "EXISTS" not in s
        ]


async def _client(store: Store, client_id: str, name: str) -> None:
    async with store.write() as db:
        await db.execute(
            "INSERT INTO clients (client_id, name, created_at) VALUES (?, ?, 'x')",
            (client_id, name),
        )


async def _rule(store: Store, client_id: str, port: int, owner: str = "") -> int:
    rule = build_rule(
        id="0",
        protocol="tcp",
        listen=(port, port),
        targets=[Target("127.0.0.1", 9)],
        owner=owner,
    )
    async with store.write() as db:
        return await rules_db.insert_rule(db, client_id, rule)


def _file(settings: Settings) -> dict[str, Any]:
    with open(os.path.join(settings.runtime_dir, counters.TOTALS_FILE), encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


@pytest.fixture
def runtime(settings: Settings) -> Settings:
    os.makedirs(settings.runtime_dir, exist_ok=True)
    os.makedirs(settings.metrics_dir, exist_ok=True)
    return settings


async def _fleet(store: Store) -> dict[str, list[int]]:
    """Two edge clients with two rules each."""
    out: dict[str, list[int]] = {}
    for cid, name in (("edge-a", "alpha"), ("edge-b", "beta")):
        await _client(store, cid, name)
        out[cid] = [await _rule(store, cid, 8000), await _rule(store, cid, 8001, owner="7")]
    return out


async def test_a_counter_that_moves_is_seen(
    store: Store, runtime: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await _fleet(store)
    a1, a2 = ids["edge-a"]
    remote = FakeRemote()
    rc = counters.RuleCounters(store, runtime, remote)
    await rc.snapshot()
    doc = _file(runtime)
    assert set(doc["remote"]) == {str(i) for v in ids.values() for i in v}
    assert doc["remote"][str(a1)] == {
        "client": "alpha",
        "owner": "",
        **ZERO,
        "active_connections": 0,
    }
    assert doc["remote"][str(a2)]["owner"] == "7"

    remote.up.add("edge-a")
    remote.runs["edge-a"] = "run-1"
    remote.report(
        "edge-a",
        **{
            f"r{a1}": {
                "bytes_in": 10,
                "bytes_out": 20,
                "connections_total": 3,
                "active_connections": 2,
            }
        },
    )
    await rc.snapshot()
    row = _file(runtime)["remote"][str(a1)]
    assert (row["bytes_in"], row["bytes_out"], row["connections_total"]) == (10, 20, 3)
    assert row["active_connections"] == 2
    async with store.read() as db:
        async with db.execute(
            "SELECT last_bytes_in, run FROM rule_counters WHERE rule_id = ?", (a1,)
        ) as cur:
            assert tuple(await cur.fetchone()) == (10, "run-1")

    # The client restarts (a new run counting from zero): the old run is banked.
    remote.runs["edge-a"] = "run-2"
    remote.report("edge-a", **{f"r{a1}": {"bytes_in": 1, "bytes_out": 0, "connections_total": 1}})
    await rc.snapshot()
    assert _file(runtime)["remote"][str(a1)]["bytes_in"] == 11
    # It disconnects: its active connections are no longer exported.
    remote.up.clear()
    await rc.snapshot()
    assert _file(runtime)["remote"][str(a1)]["active_connections"] == 0


async def test_an_idle_snapshot_reads_no_rule_and_keeps_the_file(
    store: Store, runtime: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await _fleet(store)
    reads = Reads(monkeypatch)
    remote = FakeRemote()
    remote.up.update(ids)
    for cid, (r1, r2) in ids.items():
        remote.report(cid, **{f"r{r1}": {"bytes_in": 5}, f"r{r2}": {"bytes_in": 6}})
    rc = counters.RuleCounters(store, runtime, remote)
    await rc.snapshot()
    assert reads.all == 1 and reads.ids == []
    path = os.path.join(runtime.runtime_dir, counters.TOTALS_FILE)
    first = os.stat(path).st_ino  # replace_file renames a new file in: a new inode

    await store.db.set_trace_callback(reads.sql.append)
    for _ in range(3):
        await rc.snapshot()
    assert reads.all == 1 and reads.ids == []
    assert any("counted_rule_changes" in s for s in reads.sql)  # the trace sees statements
    assert reads.rule_rows_read() == []
    assert os.stat(path).st_ino == first  # nothing changed: not rewritten

    # One client's counter moves: still no rule row read, only that row changes.
    a1 = ids["edge-a"][0]
    before = _file(runtime)
    remote.report("edge-a", **{f"r{a1}": {"bytes_in": 50}, f"r{ids['edge-a'][1]}": {"bytes_in": 6}})
    await rc.snapshot()
    after = _file(runtime)
    assert reads.ids == [] and reads.rule_rows_read() == []
    assert after["remote"][str(a1)]["bytes_in"] == 50
    assert {k: v for k, v in after["remote"].items() if k != str(a1)} == {
        k: v for k, v in before["remote"].items() if k != str(a1)
    }
    await store.db.set_trace_callback(None)


async def test_a_removed_rule_is_dropped_and_only_it_is_read(
    store: Store, runtime: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule churn must not grow control: the carry and row of a deleted rule go at the
    next snapshot, which reads the journal's one id and no other rule."""
    ids = await _fleet(store)
    reads = Reads(monkeypatch)
    rc = counters.RuleCounters(store, runtime, FakeRemote())
    await rc.snapshot()
    gone = ids["edge-b"][1]
    assert gone in rc.carry and gone in rc.rules
    async with store.write() as db:
        await rules_db.delete_rule(db, gone)
    await rc.snapshot()
    assert reads.ids == [[gone]]
    assert gone not in rc.carry and gone not in rc.rules
    assert str(gone) not in _file(runtime)["remote"]
    # The client's last rule goes too: nothing is kept about the client.
    async with store.write() as db:
        await rules_db.delete_rule(db, ids["edge-b"][0])
    await rc.snapshot()
    assert "edge-b" not in rc.by_client and "edge-b" not in rc._seen


async def test_new_rules_and_a_renamed_client_are_read_by_id(
    store: Store, runtime: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await _fleet(store)
    reads = Reads(monkeypatch)
    rc = counters.RuleCounters(store, runtime, FakeRemote())
    await rc.snapshot()
    added = await _rule(store, "edge-a", 8002)
    await rc.snapshot()
    assert reads.ids == [[added]]
    assert _file(runtime)["remote"][str(added)]["client"] == "alpha"
    async with store.write() as db:
        await db.execute("UPDATE clients SET name = 'gamma' WHERE client_id = 'edge-b'")
    await rc.snapshot()
    assert reads.ids[-1] == sorted(ids["edge-b"])
    doc = _file(runtime)["remote"]
    assert {doc[str(i)]["client"] for i in ids["edge-b"]} == {"gamma"}
    assert {doc[str(i)]["client"] for i in [*ids["edge-a"], added]} == {"alpha"}


async def test_a_rolled_back_change_is_not_journalled(store: Store) -> None:
    async with store.read() as db:
        await rule_journal.install(db)
    await _client(store, "edge-a", "alpha")
    with pytest.raises(RuntimeError):
        async with store.write() as db:
            await rules_db.insert_rule(
                db,
                "edge-a",
                build_rule(id="0", protocol="tcp", listen=(1, 1), targets=[Target("127.0.0.1", 9)]),
            )
            raise RuntimeError("boom")
    async with store.read() as db:
        assert await rule_journal.take(db) == []


async def test_local_rules_carry_their_base_from_the_metrics_files(
    store: Store, runtime: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from portunus.metrics import per_rule

    rid = await _rule(store, "local", 9000)
    live: dict[str, dict[str, int]] = {}
    monkeypatch.setattr(per_rule, "rule_totals", lambda d, ids: {i: live.get(i, {}) for i in ids})
    monkeypatch.setenv("PORTUNUS_RUN_ID", "serve-1")
    rc = counters.RuleCounters(store, runtime, None)
    await rc.snapshot()
    assert _file(runtime)["local"] == {}  # nothing counted yet: no row
    live[str(rid)] = {"bytes_in": 4, "bytes_out": 5, "connections_total": 1}
    await rc.snapshot()
    row = _file(runtime)["local"][str(rid)]
    assert row["known"] == {"bytes_in": 4, "bytes_out": 5, "connections_total": 1}
    assert row["bytes_in"] == 0  # the base: what earlier runs counted


async def test_incremental_rows_match_a_full_snapshot(
    store: Store, runtime: Settings, tmp_path: Path
) -> None:
    """After a mix of changes, the incremental file equals what a fresh snapshot of
    every rule (same carried totals) writes."""
    ids = await _fleet(store)
    remote = FakeRemote()
    rc = counters.RuleCounters(store, runtime, remote)
    await rc.snapshot()
    steps = [
        lambda: remote.report("edge-a", **{f"r{ids['edge-a'][0]}": {"bytes_in": 3}}),
        lambda: remote.up.add("edge-a"),
        lambda: remote.runs.__setitem__("edge-b", "b-1"),
        lambda: remote.report("edge-b", **{f"r{ids['edge-b'][1]}": {"connections_total": 9}}),
        lambda: remote.up.discard("edge-a"),
    ]
    for step in steps:
        step()
        await rc.snapshot()
        other = copy.copy(runtime)
        other.runtime_dir = str(tmp_path / f"full-{len(os.listdir(tmp_path))}")
        os.makedirs(other.runtime_dir)
        full = counters.RuleCounters(store, other, remote)
        full.carry = copy.deepcopy(rc.carry)
        await full.snapshot()
        assert _file(other) == _file(runtime)


async def test_a_failed_snapshot_loses_no_row_to_rebuild(
    store: Store, runtime: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot that fails after reading the journal (a shard's metrics file caught
    while it is created) leaves the new rules it read for the next one."""
    from portunus.metrics import per_rule

    await _rule(store, "local", 9000)
    await _client(store, "edge-a", "alpha")
    await _rule(store, "edge-a", 7000)  # the client is known (looked at) before
    fail = [False]

    def totals(d: str, ids: Any) -> dict[str, dict[str, int]]:
        if fail[0]:
            raise OSError("metrics file half-created")
        return {i: {} for i in ids}

    monkeypatch.setattr(per_rule, "rule_totals", totals)
    rc = counters.RuleCounters(store, runtime, FakeRemote())
    await rc.snapshot()
    added = await _rule(store, "edge-a", 8000)
    fail[0] = True
    with pytest.raises(OSError):
        await rc.snapshot()
    fail[0] = False
    await rc.snapshot()
    assert _file(runtime)["remote"][str(added)]["client"] == "alpha"
    # A rule removed between the failure and the next snapshot is simply gone.
    added2 = await _rule(store, "edge-a", 8001)
    fail[0] = True
    with pytest.raises(OSError):
        await rc.snapshot()
    async with store.write() as db:
        await rules_db.delete_rule(db, added2)
    fail[0] = False
    await rc.snapshot()
    assert str(added2) not in _file(runtime)["remote"]
