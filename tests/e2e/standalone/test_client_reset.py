"""A client that vanishes with a reset (RST) mid-connection: the forwarder must
close the upstream side too, whatever path the relay is on.  A missed reset leaks
the connection and its upstream for as long as the target stays quiet."""

from __future__ import annotations

import socket
import struct

import pytest

from tests.e2e.support import connect, echo, recv_exact, wait_for

PATHS = ("splice", "copy")


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # linger 0: RST instead of FIN


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("exchanges", [2, 64], ids=["fresh", "long-lived"])
def test_client_reset_closes_the_upstream(
    standalone, origin, ports, path: str, exchanges: int
) -> None:  # type: ignore[no-untyped-def]
    """2 exchanges: the relay is still young; 64: well past the point where a
    spliced relay moves from the shard's poller to the loop's readers."""
    org = origin(echo)
    port = ports.port()
    standalone(
        [{"name": "rst", "listen_port": port, "target": org.address}], splice=path == "splice"
    )
    s = connect(port)
    for i in range(exchanges):
        msg = f"ping {i:04d}\n".encode()
        s.sendall(msg)
        assert recv_exact(s, len(msg)) == msg
    rec = org.wait_connections(1)[0]
    assert not rec.done.is_set()
    _reset(s)
    wait_for(
        rec.done.is_set, 5, what="the origin's connection to be closed after the client's reset"
    )
