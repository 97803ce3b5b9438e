"""Per-rule idle timeout (``idle_timeout_secs``, default off): a TCP connection that
moves no byte for that long is closed by the proxy while a busy one stays; a UDP
flow is reaped after the rule's timeout instead of udp_flow_idle_secs."""

from __future__ import annotations

import socket
import time

from tests.e2e.support import LOOPBACK, ServerProc, connect, echo, recv_exact, wait_for


def _closed_by_peer(s: socket.socket, within: float) -> float | None:
    """Seconds until the proxy closed ``s`` (EOF or reset), or None if it stayed open."""
    s.settimeout(within)
    t0 = time.monotonic()
    try:
        data = s.recv(1)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return time.monotonic() - t0
    assert data == b"", data
    return time.monotonic() - t0


def test_idle_tcp_connection_is_closed_busy_one_stays(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=1)
    org = origin(echo)
    port, plain = ports.ports(2)
    rule = srv.cli_json("push-rule", "local", str(port), org.address, "--idle-timeout", "1")
    assert rule["idle_timeout_secs"] == 1.0
    assert srv.cli_json("push-rule", "local", str(plain), org.address)["idle_timeout_secs"] is None
    idle, busy, untimed = connect(port), connect(port), connect(plain)
    try:
        for s in (idle, busy, untimed):
            s.sendall(b"hi")
            assert recv_exact(s, 2) == b"hi"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:  # keep one connection busy past the timeout
            busy.sendall(b"x")
            assert recv_exact(busy, 1) == b"x"
            time.sleep(0.2)
        took = _closed_by_peer(idle, 0.1)
        assert took is not None, (
            "the idle connection is still open after 3 s with idle_timeout_secs = 1"
        )
        busy.sendall(b"y")
        assert recv_exact(busy, 1) == b"y", "the busy connection was closed"
        assert _closed_by_peer(untimed, 0.5) is None, (
            "a rule without idle_timeout_secs closed an idle connection"
        )
    finally:
        for s in (idle, busy, untimed):
            s.close()
    assert srv.events("tcp.idle_timeout")


def test_idle_timeout_holds_when_python_connects_and_the_relay_could_be_native(  # type: ignore[no-untyped-def]
    server, origin, ports
) -> None:
    """A target given by name is connected in Python and then, for a plain rule, handed
    to the native relay (tcp.start_pumps); with idle_timeout_secs it must stay in
    Python, where the idle clock is, or the idle connection would live forever."""
    srv: ServerProc = server(shards=1)
    org = origin(echo)
    port = ports.port()
    srv.cli_json("push-rule", "local", str(port), f"localhost:{org.port}", "--idle-timeout", "1")
    idle = connect(port)
    try:
        idle.sendall(b"hi")
        assert recv_exact(idle, 2) == b"hi"
        took = _closed_by_peer(idle, 4.0)
        assert took is not None, "the idle connection to a named target is still open after 4 s"
    finally:
        idle.close()
    assert srv.events("tcp.idle_timeout")


def test_udp_flow_reaped_after_the_rules_idle_timeout(standalone, ports) -> None:  # type: ignore[no-untyped-def]
    echo_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo_sock.bind((LOOPBACK, 0))
    port = ports.port()
    proc = standalone(
        [
            {
                "name": "u",
                "protocol": "udp",
                "listen_port": port,
                "target": f"{LOOPBACK}:{echo_sock.getsockname()[1]}",
                "idle_timeout_secs": 0.5,
            }
        ],
        settings={"udp_flow_idle_secs": 60},
    )
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.sendto(b"ping", (LOOPBACK, port))
        echo_sock.settimeout(5)
        data, _ = echo_sock.recvfrom(100)
        assert data == b"ping"
        wait_for(
            lambda: proc.scrape().value("portunus_udp_flows_active", rule="u") == 1,
            5,
            what="one flow",
        )
        t0 = time.monotonic()
        wait_for(
            lambda: proc.scrape().value("portunus_udp_flows_active", rule="u") == 0,
            5,
            what="the flow reaped after idle_timeout_secs = 0.5 (udp_flow_idle_secs = 60)",
        )
        assert time.monotonic() - t0 < 3.0
    finally:
        client.close()
        echo_sock.close()
