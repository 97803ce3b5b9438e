"""Slowloris on the edge gateway: 2,000 anonymous connections from 125 loopback
addresses (16 each: the per-source limit refuses none of them), trickling a TLS
ClientHello one byte at a time or saying nothing, and opened again as soon as
the gateway closes them.  Meanwhile real peers get through: TLS handshakes with
a first frame answered, and a real ``portunus-client`` that enrolls, connects
and forwards bytes for a rule pushed to it.  Once the crowd stops coming back,
every one is closed by the handshake deadline and the control process's fds and
memory go back to where they were.

The server runs with ``edge_handshake_timeout_secs = 2`` (default 10) so the
test takes seconds, and the default anonymous limits (128 at once, 16 per
source): without reclaiming the longest-waiting connection at the global limit,
128 slow peers would lock every real client out (portunus.control.fleet.preauth).
"""

from __future__ import annotations

import json
import socket
import ssl
import statistics
import struct
import time
from pathlib import Path
from typing import Any

from portunus.ipc.edge_wire import encode_frame
from tests.e2e.edge.clients import ClientFactory, enroll
from tests.e2e.edge.test_edge_server import mint, push, wait_connected
from tests.e2e.support import (
    LOOPBACK,
    PortAllocator,
    ServerFactory,
    echo,
    echo_roundtrip,
    recv_exact,
    wait_for,
)
from tests.e2e.support.slowloris import (
    MiB,
    RssSampler,
    SlowCrowd,
    client_hello,
    fd_headroom,
    loopback_sources,
    settled_rss,
)

SLOW = 2000
TIMEOUT = 2.0
CAP = 128  # the default edge_preauth_max_connections
PER_SOURCE = 16  # the default edge_preauth_max_per_source
# Measured 9-10 MiB of growth (46.6 -> 56.7 MiB peak; a crowd, a client, a push)
# in six runs.
RSS_BOUND = 24 * MiB
# A real handshake took 11-20 ms (median) and at most 0.59-1.33 s while the crowd
# was up, on a shared 2-core machine with a load average of 6-10; the control
# process itself used 8-12 % of a core then.  Starved, it would not answer at all.
VISIT_BOUND = 3.0
CPU_BOUND = 0.6  # of one core, for the control process during the attack


def tls_visit(port: int) -> float:
    """Seconds for a real TLS handshake with the gateway and an answer to a first
    frame (a ``hello`` with a token nobody holds: ``unauthenticated``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    t0 = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(encode_frame({"type": "hello", "token": "not-a-token", "client_id": "x"}))
            (length,) = struct.unpack(">I", recv_exact(tls, 4))
            answer = json.loads(recv_exact(tls, length))
    assert answer.get("code") == "unauthenticated", answer
    return time.monotonic() - t0


def test_slow_anonymous_peers_cannot_starve_the_gateway(
    server: ServerFactory,
    clients: ClientFactory,
    tmp_path: Path,
    ports: PortAllocator,
    origin: Any,
) -> None:
    fd_headroom(4500)
    srv = server(settings={"edge_handshake_timeout_secs": TIMEOUT})
    control = srv.child("control")
    assert control is not None
    minted = mint(srv, "edge-01")
    bundle = tmp_path / "edge-01.json"
    o = origin(echo)
    rule_port = ports.port()
    tls_visit(srv.control_port)
    base_fds = control.num_fds()
    base_rss = settled_rss(control)

    crowd = SlowCrowd(
        srv.control_port,
        SLOW,
        payload=client_hello("edge.example.test"),
        sources=loopback_sources(SLOW // PER_SOURCE),
        silent_every=2,
        reopen_per_tick=100,  # 400 new slow connections a second while the attack lasts
    )
    visits: list[float] = []
    with RssSampler(control) as sampler:
        crowd.start()
        attack_started = time.monotonic()
        for _ in range(10):
            visits.append(tls_visit(srv.control_port))
            time.sleep(0.1)
        # A real client enrolls (one attempt), connects and forwards.
        res = enroll(minted["uri"], bundle)
        assert res.returncode == 0, res.stderr
        clients(bundle, name="edge-01")
        wait_connected(srv, minted["client_id"], timeout=20)
        assert push(srv, "edge-01", rule_port, o.address)["state"] == "active"
        assert echo_roundtrip(rule_port)
        # The attack outlived several deadlines while the client got through.
        while time.monotonic() - attack_started < 3 * TIMEOUT:
            visits.append(tls_visit(srv.control_port))
            time.sleep(0.1)
        attack_secs = time.monotonic() - attack_started
        crowd.stop_reopening()
        drained = crowd.wait_all_closed(TIMEOUT + 3)
    crowd.stop()
    # The client's link is the one fd the control process keeps.
    wait_for(
        lambda: control.num_fds() <= base_fds + 3,
        10,
        what=lambda: f"control fds back to {base_fds} + the link (now {control.num_fds()})",
    )
    end_fds = control.num_fds()
    metrics = srv.scrape()
    refused = {
        r: metrics.value("portunus_edge_preauth_refused_total", reason=r)
        for r in ("max_connections", "max_per_source", "evicted", "timeout")
    }
    print(
        f"edge slowloris: {crowd.opened} slow connections opened over {attack_secs:.1f} s "
        f"({crowd.peak_open} at once), {crowd.closed} closed by the gateway, longest held "
        f"{max(crowd.held_secs):.2f} s, last closed {drained:.2f} s after the attack; "
        f"refused {refused}; {len(visits)} TLS visits meanwhile, median "
        f"{statistics.median(visits) * 1000:.0f} ms, max {max(visits) * 1000:.0f} ms; "
        f"control fds {base_fds} -> peak {sampler.peak_fds} -> {end_fds}, "
        f"CPU {sampler.cpu:.0%} of a core; "
        f"control RSS {base_rss / MiB:.1f} -> peak {sampler.peak / MiB:.1f} MiB"
    )

    assert crowd.opened >= SLOW and crowd.peak_open > CAP, (crowd.opened, crowd.peak_open)
    assert crowd.closed == crowd.opened
    # The gateway held as many as its limit allows (plus the ones being closed).
    assert base_fds + CAP * 0.9 <= sampler.peak_fds <= base_fds + CAP + 64, sampler.peak_fds
    assert max(crowd.held_secs) < TIMEOUT + 1.5, max(crowd.held_secs)
    # Room was made by cutting the longest-waiting peers, never by refusing at once.
    assert refused["evicted"] > SLOW / 2 and refused["timeout"] > 0, refused
    assert refused["max_connections"] == 0 and refused["max_per_source"] == 0, refused
    assert max(visits) < VISIT_BOUND, sorted(visits)[-5:]
    assert sampler.cpu < CPU_BOUND, sampler.cpu
    assert srv.scrape().value("portunus_clients_connected") == 1
    assert echo_roundtrip(rule_port)
    assert sampler.peak - base_rss < RSS_BOUND, (base_rss, sampler.peak)
