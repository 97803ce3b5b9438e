"""Reloaded settings go only to the children that read them (``takes_settings``,
declared by the process tree): the metrics child never reads its channel after
``up``, so a ``settings`` frame per SIGHUP would pile up in its socket buffer, and
then in the supervisor's own write buffer, reload after reload."""

from __future__ import annotations

import fcntl
import signal
import struct
import termios
from pathlib import Path

from portunus.process_trees import CLIENT, METRICS, STANDALONE
from portunus.supervisor.arbiter import Supervisor
from portunus.supervisor.children import Child
from portunus.supervisor.policy import Role

from .fakes import Clock, Recorder, Reports, child, drive, idles, supervising

RELOADS = 200


def unread_by_peer(ch: Child) -> int:
    """Bytes the supervisor wrote to ``ch`` that ``ch`` has not read yet: on a Unix
    stream socket the send queue (SIOCOUTQ = TIOCOUTQ) holds them until the peer
    reads them."""
    assert ch.channel is not None
    raw = fcntl.ioctl(ch.channel.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def test_the_trees_declare_that_the_metrics_child_takes_no_settings() -> None:
    assert METRICS.takes_settings is False
    for tree in (CLIENT, STANDALONE):
        assert any(b is METRICS for b in tree.branches)
        assert all(b.takes_settings for b in tree.branches if b is not METRICS)


def test_many_reloads_leave_no_unread_bytes_for_the_metrics_child(
    tmp_path: Path,
) -> None:
    reports = Reports()
    shard = Recorder(reports, "shard-0")
    web = Recorder(reports, "web")  # a child that reads its settings frames
    metrics = child(Role.METRICS, idles(up=True))  # says up, never reads again
    metrics.takes_settings = METRICS.takes_settings
    levels = iter(["debug", "info"] * RELOADS)
    sup = Supervisor(
        children=[
            child(Role.SHARD, shard.entry("ready")),
            child(Role.WEB, web.entry("up")),
            metrics,
        ],
        listen_address="127.0.0.1",
        shard_settings={},
        drain_secs=0.0,
        metrics_dir=str(tmp_path),
        reloader=lambda: {"log_level": next(levels)},
        clock=Clock(),
    )
    try:
        with supervising(sup):
            drive(sup, lambda: metrics.up and sup.announced_ready, what="every child up")
            for _ in range(RELOADS):
                sup.signals.put_nowait(signal.SIGHUP)  # as the handler would
                sup.tick(0.0)
            drive(
                sup,
                lambda: len(reports.of("web", "settings")) >= RELOADS,
                what=f"{RELOADS} settings frames read by web",
            )
            assert len(reports.of("shard-0", "config")) >= RELOADS  # shards still get theirs
            assert unread_by_peer(metrics) == 0
            assert metrics.channel is not None and not metrics.channel.wants_write
            assert metrics.alive
    finally:
        shard.close()
        web.close()
        reports.close()
