"""rules.stats aggregation from a real multiprocess dir.

prometheus_client picks its value class when it is imported, from
PROMETHEUS_MULTIPROC_DIR: the "shards" that write the files therefore run in
subprocesses with the variable set, exactly like the real ones; reading needs
only the path and happens in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from portunus.control.stats import rule_stats
from portunus.rules import Target, build_rule

WRITER = textwrap.dedent(
    """
    import json, sys
    from prometheus_client import Counter, Gauge
    from prometheus_client.multiprocess import mark_process_dead
    spec = json.loads(sys.argv[1])
    made = {}
    for name, kind, labels, mode, values in spec:
        if name not in made:
            names = list(labels)
            if kind == "counter":
                made[name] = Counter(name, name, names)
            else:
                made[name] = Gauge(name, name, names, multiprocess_mode=mode)
        m = made[name].labels(**labels)
        if kind == "counter":
            m.inc(values)
        else:
            m.set(values)
    """
)
RULE = {"client": "local", "rule": "7", "owner": ""}


def write(metrics_dir: Path, samples: list[tuple[str, str, dict[str, str], str, float]]) -> None:
    """One subprocess = one shard pid writing these samples."""
    subprocess.run(
        [sys.executable, "-c", WRITER, json.dumps(samples)],
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PATH": "/usr/bin:/bin"},
        check=True,
        timeout=30,
    )


def shard(
    bytes_in: float, active: float, other_rule: bool = False
) -> list[tuple[str, str, dict[str, str], str, float]]:
    labels = {**RULE, "rule": "8"} if other_rule else RULE
    return [
        ("portunus_rule_bytes_in_total", "counter", labels, "", bytes_in),
        ("portunus_rule_bytes_out_total", "counter", labels, "", bytes_in * 2),
        ("portunus_rule_connections_total", "counter", labels, "", 3),
        ("portunus_rule_active_connections", "gauge", labels, "livesum", active),
    ]


def test_sums_over_shards_and_ignores_other_rules(tmp_path: Path) -> None:
    rule = build_rule(
        id="7", protocol="tcp", listen=(8080, 8080), targets=[Target("127.0.0.1", 80)]
    )
    assert rule_stats(str(tmp_path / "missing"), rule) == {
        "id": 7,
        "bytes_in": 0,
        "bytes_out": 0,
        "connections_total": 0,
        "active_connections": 0,
    }
    write(tmp_path, shard(100, 2))
    write(tmp_path, shard(50, 1))
    write(tmp_path, shard(99999, 9, other_rule=True))
    stats = rule_stats(str(tmp_path), rule, per_port=True)
    assert stats["bytes_in"] == 150 and stats["bytes_out"] == 300
    assert stats["connections_total"] == 6 and stats["active_connections"] == 3
    # A single-port rule has no detail series: its one port carries the totals.
    assert stats["per_port"] == [
        {
            "port": 8080,
            "bytes_in": 150,
            "bytes_out": 300,
            "connections_total": 6,
            "active_connections": 3,
        }
    ]
    assert "per_target" not in stats


def test_per_port_and_per_target_detail(tmp_path: Path) -> None:
    rule = build_rule(
        id="7",
        protocol="tcp",
        listen=(30000, 30002),
        targets=[
            Target("10.0.0.1", 40000, port_end=40002),
            Target("10.0.0.2", 40000, port_end=40002, priority=2),
        ],
    )
    port = {"client": "local", "rule": "7"}
    t1 = {"client": "local", "rule": "7", "target": "10.0.0.1:40000-40002"}
    t2 = {**t1, "target": "10.0.0.2:40000-40002"}
    write(
        tmp_path,
        [
            ("portunus_detail_port_bytes_in_total", "counter", {**port, "port": "30001"}, "", 10),
            ("portunus_detail_port_connections_total", "counter", {**port, "port": "30001"}, "", 1),
            (
                "portunus_detail_port_active_connections",
                "gauge",
                {**port, "port": "30001"},
                "livesum",
                1,
            ),
            ("portunus_target_up", "gauge", t1, "livemin", 1),
            ("portunus_target_up", "gauge", t2, "livemin", 1),
            ("portunus_detail_target_connections_total", "counter", t1, "", 4),
        ],
    )
    write(
        tmp_path,
        [
            ("portunus_detail_port_bytes_in_total", "counter", {**port, "port": "30001"}, "", 5),
            ("portunus_detail_port_bytes_out_total", "counter", {**port, "port": "30002"}, "", 7),
            ("portunus_target_up", "gauge", t2, "livemin", 0),
            ("portunus_detail_target_connect_failures_total", "counter", t2, "", 3),
        ],
    )
    stats = rule_stats(str(tmp_path), rule, per_port=True, per_target=True)
    by_port = {p["port"]: p for p in stats["per_port"]}
    assert list(by_port) == [30000, 30001, 30002]
    assert by_port[30000] == {
        "port": 30000,
        "bytes_in": 0,
        "bytes_out": 0,
        "connections_total": 0,
        "active_connections": 0,
    }
    assert by_port[30001]["bytes_in"] == 15 and by_port[30001]["active_connections"] == 1
    assert by_port[30002]["bytes_out"] == 7
    t = {row["target"]: row for row in stats["per_target"]}
    # Dead writers still count for counters; target_up is livemin and the writer
    # processes have exited but are not marked dead, so their values remain.
    assert t["10.0.0.1:40000-40002"] == {
        "target": "10.0.0.1:40000-40002",
        "priority": 1,
        "up": True,
        "connections_total": 4,
        "connect_failures_total": 0,
    }
    assert t["10.0.0.2:40000-40002"]["up"] is False
    assert t["10.0.0.2:40000-40002"]["connect_failures_total"] == 3


GAUGE_WRITER = textwrap.dedent(
    """
    import sys
    from portunus.control.stats import RuleStateGauge
    from portunus.rules import Target, build_rule
    sink = RuleStateGauge()
    rule = build_rule(id="7", protocol="tcp", listen=(8080, 8080), targets=[Target("127.0.0.1", 80)])
    for state in sys.argv[1:]:
        sink(rule, None if state == "gone" else state)
    """
)


def read_state(metrics_dir: Path, client: str | None = None) -> dict[str, float]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    return {
        s.labels["state"]: s.value
        for fam in registry.collect()
        for s in fam.samples
        if s.name == "portunus_rule_state"
        and s.labels["rule"] == "7"
        and client in (None, s.labels["client"])
    }


def test_rule_state_gauge(tmp_path: Path) -> None:
    def run(*states: str) -> None:
        subprocess.run(
            [sys.executable, "-c", GAUGE_WRITER, *states],
            env={
                "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
            },
            check=True,
            timeout=30,
        )

    run("pending", "active")
    assert read_state(tmp_path) == {
        "pending": 0.0,
        "active": 1.0,
        "failed": 0.0,
        "draining": 0.0,
        "revoked": 0.0,
    }
    assert any(p.name.startswith("gauge_livemostrecent_") for p in tmp_path.iterdir())
    run("draining", "gone")  # a second control pid: the newest values win
    assert read_state(tmp_path) == {
        "pending": 0.0,
        "active": 0.0,
        "failed": 0.0,
        "draining": 0.0,
        "revoked": 0.0,
    }


COUNTING_WRITER = textwrap.dedent(
    """
    import sys
    from portunus.control.stats import RuleStateGauge
    from portunus.rules import Target, build_rule
    sink = RuleStateGauge()
    calls = []
    real = sink._gauge.labels
    sink._gauge.labels = lambda *a: calls.append(a) or real(*a)
    rule = build_rule(id="7", protocol="tcp", listen=(8080, 8080), targets=[Target("127.0.0.1", 80)])
    renamed = build_rule(
        id="7", protocol="tcp", listen=(8080, 8080), targets=[Target("127.0.0.1", 80)], client="edge"
    )
    for state in sys.argv[1:]:
        before = len(calls)
        which = renamed if state.startswith("edge:") else rule
        state = state.removeprefix("edge:")
        sink(which, None if state == "gone" else state)
        print(len(calls) - before)
    """
)


def test_rule_state_gauge_writes_a_state_once(tmp_path: Path) -> None:
    """A re-sync reports every rule's state again (after a restart, 30,000 of them,
    almost all unchanged): a state this process already wrote costs no gauge call."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            COUNTING_WRITER,
            *("active", "active", "active", "failed", "failed", "edge:failed", "gone", "active"),
        ],
        env={
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
        },
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    )
    # Five children per write (one per state); nothing for a repeat.
    assert out.stdout.split() == ["5", "0", "0", "5", "0", "5", "5", "5"]
    assert read_state(tmp_path, "local") == {
        "pending": 0.0,
        "active": 1.0,
        "failed": 0.0,
        "draining": 0.0,
        "revoked": 0.0,
    }
    assert read_state(tmp_path, "edge")["failed"] == 1.0  # written under the new name


async def test_rule_state_gauge_writes_off_the_callers_turn_in_chunks() -> None:
    """In control's loop a state is written a moment later, at most CHUNK rules per
    loop turn, latest state per rule: a restart's 30,000 first writes must not hold
    the loop ahead of other clients' handshakes and syncs."""
    import asyncio

    from portunus.control.stats import RuleStateGauge
    from portunus.rules import Target, build_rule

    written: list[tuple[str, str, float]] = []

    class Child:
        def __init__(self, labels: tuple[str, ...]) -> None:
            self.rule, self.state = labels[1], labels[3]

        def set(self, value: float) -> None:
            written.append((self.rule, self.state, value))

    class FakeGauge:
        def labels(self, *labels: str) -> Child:
            return Child(labels)

        def remove_by_labels(self, labels: dict[str, str]) -> None:
            written.append((labels["rule"], "removed", 0.0))

    sink = RuleStateGauge()
    sink._gauge = FakeGauge()  # type: ignore[assignment]
    rules = [
        build_rule(id=str(i), protocol="tcp", listen=(1, 1), targets=[Target("127.0.0.1", 9)])
        for i in range(1, 451)
    ]
    for r in rules:
        sink(r, "pending")
    sink(rules[0], "active")  # before the write: only the latest state is written
    assert written == []  # nothing on the caller's turn
    between: list[int] = []

    async def other_work() -> None:
        while sink._pending:
            between.append(len(written))
            await asyncio.sleep(0)

    assert sink._flusher is not None
    await asyncio.gather(sink._flusher, other_work())
    assert len(written) == 450 * 5
    assert [w for w in written if w[0] == "1" and w[2] == 1.0] == [("1", "active", 1.0)]
    # 450 rules at 200 a turn: other work ran between the chunks.
    assert sorted(set(between)) == [200 * 5, 400 * 5]
    sink(rules[5], "pending")  # already written: nothing to do
    assert not sink._pending and len(written) == 450 * 5
