"""SIGTERM: stop accepting at once, let open transfers finish within
shutdown_drain_timeout_secs, cut what is left after it, and exit 0 either way."""

from __future__ import annotations

import hashlib
import signal
import time

from tests.e2e.support import (
    KiB,
    Pattern,
    connect,
    connection_refused,
    recv_all,
    recv_exact,
    slow_source,
    wait_for,
)


def test_sigterm_drains_open_transfer_and_refuses_new(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    slow = Pattern(20 * 16 * KiB, seed=5, chunk=16 * KiB)  # 20 chunks, one per 0.1 s: ~2 s
    org = origin(slow_source(slow, interval=0.1))
    port = ports.port()
    proc = standalone(
        [{"name": "slow", "listen_port": port, "target": org.address}],
        shards=2,
        settings={"shutdown_drain_timeout_secs": 10},
    )
    with connect(port, timeout=10) as s:
        first = recv_exact(s, 16 * KiB)  # the transfer is under way
        term_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for(
            lambda: connection_refused(port),
            1.0,
            interval=0.01,
            what="new connections to be refused after SIGTERM",
        )
        refused_at = time.monotonic()
        assert proc.alive(), "the process exited instead of draining"
        rest = recv_all(s)
        done_at = time.monotonic()
    assert 16 * KiB + rest.count == slow.size, (
        f"transfer cut at {16 * KiB + rest.count} of {slow.size}"
    )
    chunks = list(slow.chunks())
    assert first == chunks[0]
    assert rest.hexdigest() == hashlib.sha256(b"".join(chunks[1:])).hexdigest(), (
        "drained bytes corrupted"
    )
    assert refused_at < done_at - 0.5, "refusal was only seen after the transfer ended"
    assert done_at - term_at >= 1.0, "the transfer should have needed ~2 s after SIGTERM"
    code = proc.wait_exit(10)
    exit_secs = time.monotonic() - term_at
    assert code == 0, proc.stderr_tail()
    assert exit_secs < 10, f"exit took {exit_secs:.1f}s (drain timeout 10s)"
    proc.wait_log("supervisor.stopped", exit_code=0)
    assert proc.children() == []


def test_sigterm_cuts_transfer_after_short_drain_timeout(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    slow = Pattern(50 * 16 * KiB, seed=6, chunk=16 * KiB)  # ~5 s
    org = origin(slow_source(slow, interval=0.1))
    port = ports.port()
    proc = standalone(
        [{"name": "slow", "listen_port": port, "target": org.address}],
        settings={"shutdown_drain_timeout_secs": 1},
    )
    with connect(port, timeout=10) as s:
        recv_exact(s, 16 * KiB)
        term_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            got = 16 * KiB + recv_all(s).count
        except ConnectionResetError:
            got = -1  # cut by a reset: also fine
        cut_secs = time.monotonic() - term_at
    assert got < slow.size, "the transfer was not cut"
    assert 0.8 <= cut_secs < 2.5, f"transfer cut {cut_secs:.2f}s after SIGTERM (drain timeout 1s)"
    code = proc.wait_exit(5)
    exit_secs = time.monotonic() - term_at
    assert code == 0, proc.stderr_tail()
    assert exit_secs < 3.5, f"exit took {exit_secs:.1f}s with a 1s drain timeout"
