"""UDP through the server: ``push-rule --protocol udp`` forwards, counts and lets go.

(Standalone UDP is covered in tests/e2e/udp/; this is the server path: CLI flag,
control process, supervisor binding, shard, rule-stats.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.features.helpers import ServerFactory, UdpPortEcho, bindable, udp_exchange
from tests.e2e.support import LOOPBACK, PortAllocator, wait_for


@pytest.fixture
def udp_origin(ports: PortAllocator) -> Iterator[UdpPortEcho]:
    echo = UdpPortEcho([ports.port()])
    yield echo
    echo.close()


def test_server_udp_rule_forwards_counts_and_releases(
    server: ServerFactory, ports: PortAllocator, udp_origin: UdpPortEcho
) -> None:
    srv = server()
    target = next(iter(udp_origin.received))
    listen = ports.port()
    rule = srv.cli_json(
        "push-rule", "local", str(listen), f"{LOOPBACK}:{target}", "--protocol", "udp"
    )
    assert (rule["protocol"], rule["state"], rule["listen_port"]) == ("udp", "active", listen)
    replies = [udp_exchange(listen, b"datagram %d" % i) for i in range(10)]
    assert replies == [f"{target}:datagram {i}".encode() for i in range(10)]
    sent = sum(len(b"datagram %d" % i) for i in range(10))
    back = sent + 10 * len(f"{target}:")

    def stats() -> tuple[int, int]:
        st = srv.cli_json("rule-stats", str(rule["id"]))
        return st["bytes_in"], st["bytes_out"]

    wait_for(
        lambda: stats() == (sent, back),
        5,
        what=lambda: f"UDP bytes ({sent}, {back}) in rule-stats, have {stats()}",
    )
    assert not bindable(listen, "udp")
    assert bindable(listen, "tcp"), "a UDP rule must not hold the TCP port"
    srv.remove_rule(rule["id"])
    wait_for(lambda: bindable(listen, "udp"), 10, what="UDP port released after remove-rule")
