"""The process tree of `portunus-standalone --shards N`, named with setproctitle."""

from __future__ import annotations

import signal

import psutil

from tests.e2e.support import StandaloneFactory, echo, listening_ports, title_of, wait_for


def test_process_tree(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    """--shards 3: three `portunus: shard N` children plus `portunus: metrics`,
    under a `portunus: supervisor (standalone)` root."""
    org = origin(echo)
    proc = standalone([{"name": "t", "listen_port": ports.port(), "target": org.address}], shards=3)
    titles = sorted(proc.titled())
    assert titles == [
        "portunus: metrics",
        "portunus: shard 0",
        "portunus: shard 1",
        "portunus: shard 2",
    ]
    root = psutil.Process(proc.pid)
    assert " ".join(root.cmdline()).strip() == "portunus: supervisor (standalone)"
    m = proc.scrape()
    assert {lab["process"] for lab in m.labels_of("portunus_process_resident_memory_bytes")} == {
        "supervisor",
        "metrics",
        "shard-0",
        "shard-1",
        "shard-2",
    }


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_shards_exit_when_the_supervisor_is_killed(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    """Nobody holds a shard's listeners once the supervisor is gone: shards stop."""
    org = origin(echo)
    proc = standalone([{"name": "o", "listen_port": ports.port(), "target": org.address}], shards=2)
    shard_pids = [p.pid for p in proc.shards().values()]
    proc.send_signal(signal.SIGKILL)
    wait_for(lambda: _gone(shard_pids), 5, what="orphaned shards to exit")
    assert len(proc.events("shard.supervisor_lost")) == 2


def test_no_child_outlives_a_killed_supervisor(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    proc = standalone([{"name": "o", "listen_port": ports.port(), "target": org.address}], shards=2)
    pids = [p.pid for p in proc.children()]
    assert len(pids) == 3
    proc.send_signal(signal.SIGKILL)
    try:
        wait_for(lambda: _gone(pids), 3, what="every child to exit")
    except AssertionError:
        left = [title_of(psutil.Process(p)) for p in pids if not _gone([p])]
        raise AssertionError(f"still running 5 s after the supervisor died: {left}") from None
    assert proc.metrics_port not in listening_ports()


def test_teardown_kills_the_whole_tree(tmp_path, ports, origin) -> None:  # type: ignore[no-untyped-def]
    """The fixture's own guarantee: kill_tree leaves no process behind, even when
    the root died first and its children were re-parented."""
    org = origin(echo)
    factory = StandaloneFactory(tmp_path, ports)
    try:
        proc = factory(
            [{"name": "k", "listen_port": ports.port(), "target": org.address}], shards=2
        )
        pids = [proc.pid, *(p.pid for p in proc.children())]
        proc.send_signal(signal.SIGKILL)
        proc.wait_exit(5)
    finally:
        factory.close()
    wait_for(lambda: _gone(pids), 5, what="every process of the tree to be gone")
