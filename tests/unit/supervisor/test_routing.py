"""Rule routing half of the supervisor (routing.py, rulebook.py, retry.py) with fake
shards and a fake rule source forked by the real supervisor: what each shard is
handed (its own listener fd per port, then the rules), what the source is
answered, drains, retries and respawns."""

from __future__ import annotations

import os
import random
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from portunus.rules import Rule, Target
from portunus.supervisor import routing
from portunus.supervisor.arbiter import RuleSource, Supervisor
from portunus.supervisor.policy import Role
from portunus.supervisor.retry import RETRY_FIRST_SECS

from .fakes import Clock, Recorder, Reports, child, drive, make_supervisor, supervising

SHARDS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_range(n: int) -> int:
    """The first of ``n`` consecutive free TCP ports on 127.0.0.1."""
    for _ in range(50):
        base = random.randrange(20000, 32000)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {n} consecutive free ports")


def rule(rid: str, port: int, last: int | None = None) -> Rule:
    return Rule(
        id=rid,
        protocol="tcp",
        listen_start=port,
        listen_end=port if last is None else last,
        targets=(Target(host="127.0.0.1", port=9),),
    )


class World:
    """A supervisor with SHARDS recording shards and a recording rule source."""

    def __init__(self, sup: Supervisor, reports: Reports, recorders: dict[str, Recorder]) -> None:
        self.sup = sup
        self.reports = reports
        self.recorders = recorders

    def tell_source(self, msg: dict[str, Any]) -> None:
        self.recorders["control"].tell(msg)

    def wait(self, name: str, kind: str, n: int = 1) -> list[dict[str, Any]]:
        """The first ``n`` frames of ``kind`` that ``name`` received."""
        drive(
            self.sup,
            lambda: len(self.reports.of(name, kind)) >= n,
            what=f"{n} {kind!r} frame(s) to {name}",
        )
        return self.reports.of(name, kind)[:n]

    def kinds(self, name: str) -> list[str]:
        return [r["type"] for r in self.reports.of(name)]

    def inodes(self, key: str) -> list[int]:
        """The supervisor's own sockets for ``key``, one per shard."""
        return [os.fstat(s.fileno()).st_ino for s in self.sup.listeners.sockets[key]]


@contextmanager
def build(
    tmp_path: Path, clock: Clock, *, drains: tuple[bool, ...] = (True,) * SHARDS
) -> Iterator[World]:
    reports = Reports()
    recorders: dict[str, Recorder] = {}
    kids = []
    for i in range(SHARDS):
        rec = recorders[f"shard-{i}"] = Recorder(reports, f"shard-{i}", drains=drains[i])
        kids.append(child(Role.SHARD, rec.entry("ready"), i))
    source = recorders["control"] = Recorder(reports, "control")
    kids.append(child(Role.CONTROL, source.entry("up")))
    sup = make_supervisor(kids, clock, tmp_path, source_role=Role.CONTROL)
    try:
        with supervising(sup):
            world = World(sup, reports, recorders)
            world.wait("control", "hello")
            yield world
    finally:
        for rec in recorders.values():
            rec.close()
        reports.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def world(tmp_path: Path, clock: Clock) -> Iterator[World]:
    with build(tmp_path, clock) as built:
        yield built


def test_the_source_is_greeted_with_the_shard_count(world: World) -> None:
    assert world.reports.of("control", "hello")[0]["shards"] == SHARDS


def test_each_shard_gets_its_own_listener_per_port_before_the_rules(world: World) -> None:
    port = free_port()
    world.tell_source({"type": "sync", "seq": 1, "rules": [rule("7", port).to_wire()]})
    (applied,) = world.wait("control", "applied")
    assert applied["results"] == {"7": {"state": "active", "reason": None}}
    ours = world.inodes(f"tcp/{port}")
    assert len(set(ours)) == SHARDS, "one SO_REUSEPORT socket per shard"
    for i in range(SHARDS):
        name = f"shard-{i}"
        world.wait(name, "rules", 2)  # the empty table at spawn, then rule 7
        got = [r for r in world.reports.of(name, "listeners") if r.get("add")]
        assert [(r["add"], r["inodes"]) for r in got] == [([f"tcp/{port}"], [ours[i]])]
        kinds = world.kinds(name)
        assert kinds.index("listeners") < len(kinds) - 1 - kinds[::-1].index("rules")
        assert world.reports.of(name, "rules")[-1]["upsert"] == ["7"]


def test_many_ports_are_handed_in_batches_of_fds(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wide range needs more fds than one frame may carry (the kernel's
    SCM_MAX_FD): they go in batches, every key with its own shard's socket."""
    monkeypatch.setattr(routing, "MAX_FDS_PER_FRAME", 2)
    base = free_range(5)
    world.tell_source({"type": "sync", "seq": 1, "rules": [rule("r", base, base + 4).to_wire()]})
    (applied,) = world.wait("control", "applied")
    assert applied["results"]["r"]["state"] == "active"
    world.wait("shard-1", "rules", 2)
    frames = [r for r in world.reports.of("shard-1", "listeners") if r.get("add")]
    assert [len(r["inodes"]) for r in frames] == [2, 2, 1]
    handed = {key: ino for r in frames for key, ino in zip(r["add"], r["inodes"], strict=True)}
    keys = [f"tcp/{p}" for p in range(base, base + 5)]
    assert handed == {key: world.inodes(key)[1] for key in keys}


def test_a_respawned_shard_is_handed_everything_again_on_the_same_socket(
    world: World,
) -> None:
    port = free_port()
    world.tell_source({"type": "sync", "seq": 1, "rules": [rule("7", port).to_wire()]})
    world.wait("control", "applied")
    world.tell_source({"type": "owner_caps", "caps": {"alice": {"bytes_per_sec": 1000}}})
    world.wait("shard-1", "owner_caps")
    shard = world.sup.shards[1]
    first = shard.pid
    before = len(world.reports.of("shard-1"))
    os.kill(first, signal.SIGKILL)
    drive(world.sup, lambda: shard.alive and shard.pid != first, what="shard-1 respawned")
    drive(
        world.sup,
        lambda: len(world.reports.of("shard-1")) >= before + 4,
        what="the respawned shard handed everything",
    )
    again = world.reports.of("shard-1")[before:]
    assert [r["type"] for r in again] == ["config", "listeners", "owner_caps", "rules"]
    assert again[1]["inodes"] == [world.inodes(f"tcp/{port}")[1]], "the very same socket"
    assert again[2]["caps"] == {"alice": {"bytes_per_sec": 1000}}
    assert again[3]["upsert"] == ["7"]


def test_removed_is_answered_once_every_shard_drained(tmp_path: Path, clock: Clock) -> None:
    with build(tmp_path, clock, drains=(True, False)) as world:
        port = free_port()
        world.tell_source({"type": "sync", "seq": 1, "rules": [rule("7", port).to_wire()]})
        world.wait("control", "applied")
        world.tell_source({"type": "apply", "seq": 2, "upsert": [], "remove": ["7"]})
        applied = world.wait("control", "applied", 2)[1]
        assert applied["seq"] == 2
        world.wait("shard-1", "listeners", 2)  # add at sync, remove now
        assert world.reports.of("shard-1", "listeners")[-1]["remove"] == [f"tcp/{port}"]
        drive(world.sup, lambda: world.sup.pending_drain.get("7") == {1}, what="shard-0 drained")
        for _ in range(10):
            world.sup.tick(0.01)
        assert world.reports.of("control", "removed") == [], "shard-1 still drains"
        # A shard that dies has nothing left to drain.
        os.kill(world.sup.shards[1].pid, signal.SIGKILL)
        (removed,) = world.wait("control", "removed")
        assert removed["ids"] == ["7"] and world.sup.pending_drain == {}


def test_removing_an_unknown_rule_is_answered_at_once(world: World) -> None:
    world.tell_source({"type": "apply", "seq": 1, "upsert": [], "remove": ["404"]})
    (removed,) = world.wait("control", "removed")
    assert removed["ids"] == ["404"]
    assert all(r["upsert"] == [] for r in world.reports.of("shard-0", "rules"))


def test_a_rule_whose_port_is_taken_fails_then_is_retried_after_the_backoff(
    world: World, clock: Clock
) -> None:
    blocker = socket.socket()  # no SO_REUSEPORT: the rule's bind must fail
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        world.tell_source({"type": "sync", "seq": 1, "rules": [rule("7", port).to_wire()]})
        (applied,) = world.wait("control", "applied")
        assert applied["results"]["7"]["state"] == "failed"
        assert str(port) in applied["results"]["7"]["reason"]
    finally:
        blocker.close()
    for _ in range(10):
        world.sup.tick(0.01)
    assert world.reports.of("control", "retried") == [], "not before the backoff"
    clock.advance(RETRY_FIRST_SECS)
    (retried,) = world.wait("control", "retried")
    assert retried["results"] == {"7": {"state": "active", "reason": None}}
    world.wait("shard-0", "rules", 2)
    assert world.reports.of("shard-0", "rules")[-1]["upsert"] == ["7"]
    assert world.sup.book.failed == {}


class FileSource(RuleSource):
    """An in-process source (standalone's TOML file): the rules it returns next."""

    name = "test"

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    def load(self) -> list[Rule] | None:
        return self.rules


def test_an_in_process_source_is_read_at_start_and_on_sighup(tmp_path: Path, clock: Clock) -> None:
    a, b = free_port(), free_port()
    source = FileSource([rule("a", a)])
    reports = Reports()
    rec = Recorder(reports, "shard-0")
    sup = make_supervisor([child(Role.SHARD, rec.entry("ready"))], clock, tmp_path, source=source)
    try:
        with supervising(sup):
            sup.load_source()
            drive(sup, lambda: len(reports.of("shard-0", "rules")) >= 2, what="rule a")
            assert reports.of("shard-0", "rules")[1]["upsert"] == ["a"]
            drive(sup, lambda: sup.announced_ready, what="ready")
            source.rules = [rule("a", a), rule("b", b)]
            sup.signals.put_nowait(signal.SIGHUP)  # as the handler would
            drive(sup, lambda: len(reports.of("shard-0", "rules")) >= 3, what="the reload")
            last = reports.of("shard-0", "rules")[2]
            assert (last["upsert"], last["remove"]) == (["b"], []), "only the difference"
    finally:
        rec.close()
        reports.close()
