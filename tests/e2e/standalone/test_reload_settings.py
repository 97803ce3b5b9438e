"""SIGHUP re-reads the standalone file's top-level settings too: reloadable keys
reach the running shards (udp_max_flows on a UDP port that is already served), no
process restarts, and a key that needs a restart is named, not applied."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.e2e.support import LOOPBACK, wait_for

RULE = "udp-r"


@pytest.fixture
def udp_echo() -> Iterator[socket.socket]:
    import threading

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
                sock.sendto(data, addr)
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield sock
    stop.set()
    t.join(2)
    sock.close()


def _flow(addr: tuple[str, int], payload: bytes) -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind((LOOPBACK, 0))
    c.settimeout(2.0)
    c.sendto(payload, addr)
    return c


def test_reload_lowers_udp_max_flows_on_a_served_port(standalone, ports, udp_echo) -> None:  # type: ignore[no-untyped-def]
    port = ports.port()
    target = f"{LOOPBACK}:{udp_echo.getsockname()[1]}"
    proc = standalone(
        [{"name": RULE, "protocol": "udp", "listen_port": port, "target": target}],
        shards=2,
        settings={"udp_max_flows": 50},
    )
    wait_for(
        lambda: proc.scrape().has("portunus_rule_connections_total", rule=RULE),
        10,
        what="rule series",
    )
    pids = {t: p.pid for t, p in proc.titled().items()}
    proc.write_config(settings={"udp_max_flows": 2, "metrics_listen": f"{LOOPBACK}:{ports.port()}"})
    mark = proc.log_mark()
    proc.reload()
    need = proc.wait_log("config.restart_required", since=mark)
    assert need["keys"] == ["metrics_listen"]
    # Both shards took the new limit before the flows below start.
    wait_for(
        lambda: len(proc.events("shard.reconfigured", since=mark)) == 2,
        5,
        what="both shards reconfigured",
    )
    assert proc.events("shard.reconfigured", since=mark)[0]["keys"] == ["udp_max_flows"]
    addr = (LOOPBACK, port)
    flows = [_flow(addr, f"f{i}".encode()) for i in range(3)]
    try:
        answered = 0
        for c in flows:
            try:
                c.recvfrom(100)
                answered += 1
            except TimeoutError:
                pass
        assert answered == 2, (
            f"{answered} of 3 flows answered with udp_max_flows = 2 after the reload"
        )
        # The old metrics address still serves: metrics_listen waits for a restart.
        wait_for(
            lambda: (
                proc.scrape().value("portunus_udp_flows_dropped_overflow_total", rule=RULE) >= 1
            ),
            5,
            what="the overflow counted",
        )
    finally:
        for c in flows:
            c.close()
    assert {t: p.pid for t, p in proc.titled().items()} == pids, "the reload restarted a process"
