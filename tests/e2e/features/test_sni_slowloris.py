"""Slowloris on an SNI port: 2,000 connections that trickle a ClientHello one byte
at a time, or say nothing at all, and are opened again as soon as the shard
closes them, cannot keep a normal TLS client from being routed and forwarded;
once they stop coming back, every one is closed by the ClientHello deadline and
the shard's fds and memory go back to where they were.

The shard runs with ``sni_client_hello_timeout_secs = 2`` (default 5) so the test
takes seconds.  An SNI port has no connection cap of its own: the deadline is
what bounds a slow peer, so the shard holds the whole crowd for up to 2 s.
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

import psutil

from tests.e2e.features.helpers import port_reporter, read_line
from tests.e2e.support import LOOPBACK, PortAllocator, recv_exact, wait_for
from tests.e2e.support.slowloris import (
    MiB,
    RssSampler,
    SlowCrowd,
    client_hello,
    fd_headroom,
    settled_rss,
)

SLOW = 2000
TIMEOUT = 2.0
NAME = "a.example.test"
# Measured 2.6-2.7 MiB of growth (28.6 -> 31.3 MiB peak) with 2,000 connections held,
# in three runs.
RSS_BOUND = 24 * MiB
CPU_BOUND = 0.6  # of one core, for the shard during the attack
# A normal visit took 2-4 ms (median) and at most 16-50 ms in five runs; the shard
# used 2 % of a core.
VISIT_BOUND = 2.0


def normal_visit(port: int, hello: bytes) -> float:
    """Seconds until the origin behind the SNI route answered a full ClientHello
    and echoed what followed it."""
    t0 = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.sendall(hello)
        int(read_line(s))  # the origin's greeting: the route was taken
        s.sendall(b"after the hello\n")
        assert recv_exact(s, len(hello)) == hello  # the replayed prelude, echoed
        assert recv_exact(s, 16) == b"after the hello\n"
    return time.monotonic() - t0


def test_slow_client_hellos_cannot_starve_an_sni_port(
    standalone: Any, origin: Any, ports: PortAllocator
) -> None:
    fd_headroom(4500)
    org = origin(port_reporter)
    port = ports.port()
    proc = standalone(
        [{"name": "sni", "listen_port": port, "sni": NAME, "target": org.address}],
        settings={"sni_client_hello_timeout_secs": TIMEOUT},
    )
    hello = client_hello(NAME)
    [shard] = proc.shards().values()
    assert normal_visit(port, hello) < VISIT_BOUND
    # After a first visit: the splice path keeps a small pipe pool once used.
    base_fds = wait_for(lambda: shard.num_fds(), 2)
    base_rss = settled_rss(shard)

    crowd = SlowCrowd(port, SLOW, payload=hello, silent_every=2, reopen_per_tick=100)
    visits: list[float] = []
    with RssSampler(shard) as sampler:
        crowd.start()
        attack_started = time.monotonic()
        while time.monotonic() - attack_started < 3 * TIMEOUT:
            visits.append(normal_visit(port, hello))
            time.sleep(0.1)
        crowd.stop_reopening()
        drained = crowd.wait_all_closed(TIMEOUT + 3)
    crowd.stop()
    wait_for(
        lambda: shard.num_fds() <= base_fds + 2,
        10,
        what=lambda: f"shard fds back to {base_fds} (now {shard.num_fds()})",
    )
    end_fds = shard.num_fds()
    print(
        f"sni slowloris: {crowd.opened} slow connections opened ({crowd.peak_open} at once), "
        f"{crowd.closed} closed by the shard, longest held {max(crowd.held_secs):.2f} s, last "
        f"closed {drained:.2f} s after the attack; {len(visits)} normal visits meanwhile, "
        f"median {statistics.median(visits) * 1000:.0f} ms, max {max(visits) * 1000:.0f} ms; "
        f"shard fds {base_fds} -> peak {sampler.peak_fds} -> {end_fds}, CPU {sampler.cpu:.0%} "
        f"of a core; shard RSS {base_rss / MiB:.1f} -> peak {sampler.peak / MiB:.1f} MiB"
    )

    assert crowd.opened >= SLOW and crowd.peak_open == SLOW, (crowd.opened, crowd.peak_open)
    assert crowd.closed == crowd.opened
    # No cap: the shard held the whole crowd, and the deadline alone let it go.
    assert sampler.peak_fds >= base_fds + SLOW * 0.9, sampler.peak_fds
    assert set(crowd.said) == {"(nothing)"}, crowd.said
    assert max(crowd.held_secs) < TIMEOUT + 1.5, max(crowd.held_secs)
    assert len(visits) >= 20, len(visits)
    assert max(visits) < VISIT_BOUND, sorted(visits)[-5:]
    assert sampler.peak - base_rss < RSS_BOUND, (base_rss, sampler.peak)
    assert sampler.cpu < CPU_BOUND, sampler.cpu
    assert normal_visit(port, hello) < VISIT_BOUND
    assert psutil.Process(proc.pid).is_running()
