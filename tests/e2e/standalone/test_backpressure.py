"""A client that stops reading while the origin pushes endlessly: the origin must
end up blocked (backpressure all the way back), and the shard's memory must stay
flat rather than buffering what the client does not take."""

from __future__ import annotations

import time

import pytest

from tests.e2e.support import KiB, MiB, connect, push_forever, recv_exact, wait_for

PUSH_SECS = 3.0
MAX_RSS_GROWTH = 20 * MiB
# Socket buffers (origin send, shard receive/send, client receive) and the splice
# pipe hold a bounded amount in the kernel; anything far beyond is buffering.
MAX_IN_FLIGHT = 128 * MiB


@pytest.mark.parametrize("path", ["splice", "copy"])
def test_stalled_reader_keeps_shard_memory_flat(standalone, origin, ports, path: str) -> None:  # type: ignore[no-untyped-def]
    org = origin(push_forever())
    port = ports.port()
    proc = standalone(
        [{"name": "bp", "listen_port": port, "target": org.address}], splice=path == "splice"
    )
    rss_before = proc.shard_rss()
    with connect(port, rcvbuf=64 * KiB, timeout=10) as s:
        recv_exact(s, 256 * KiB)  # data flows; from now on the client reads nothing
        rec = org.wait_connections(1)[0]
        started = time.monotonic()
        samples: list[tuple[float, int]] = []

        def origin_blocked() -> bool:
            now = time.monotonic()
            samples.append((now, rec.tx.count))
            window = [c for t, c in samples if t >= now - 1.0]
            return (
                now - started >= PUSH_SECS
                and samples[0][0] <= now - 1.0
                and window[-1] - window[0] < 256 * KiB
            )

        wait_for(
            origin_blocked,
            PUSH_SECS + 10,
            interval=0.1,
            what=lambda: f"the origin to block (sent {rec.tx.count} bytes so far)",
        )
        stuck_at = rec.tx.count
        rss_after = proc.shard_rss()
        growth = rss_after - rss_before
        assert stuck_at < MAX_IN_FLIGHT, (
            f"origin pushed {stuck_at / MiB:.0f} MiB into a stalled reader"
        )
        assert growth < MAX_RSS_GROWTH, (
            f"shard RSS grew {growth / MiB:.1f} MiB while the reader stalled"
        )
        assert rec.error is None
        # Backpressure, not a dead relay: reading again lets the origin move on.
        recv_exact(s, 8 * MiB)
        wait_for(lambda: rec.tx.count > stuck_at + 4 * MiB, 10, what="the origin to resume")
    print(
        f"{path}: origin blocked after {stuck_at / MiB:.1f} MiB, shard RSS +{growth / MiB:.2f} MiB"
    )
