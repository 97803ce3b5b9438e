"""The supervisor's listening sockets: SO_REUSEPORT, and TCP_NODELAY set once on the
listener so every accepted connection inherits it (the shard sets nothing per accept)."""

from __future__ import annotations

import socket

from portunus.supervisor.listeners import _bind_one


def test_tcp_listener_has_nodelay_and_accepted_sockets_inherit_it() -> None:
    lsock = _bind_one("tcp", "127.0.0.1", 0)
    try:
        assert lsock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        with socket.create_connection(lsock.getsockname(), timeout=2):
            conn, _ = lsock.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        lsock.close()


def test_udp_socket_is_bound_not_listening() -> None:
    s = _bind_one("udp", "127.0.0.1", 0)
    try:
        assert s.type == socket.SOCK_DGRAM and s.getsockname()[1] > 0
    finally:
        s.close()
