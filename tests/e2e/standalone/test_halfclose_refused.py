"""Half-close is honoured in both directions; an unreachable target closes the
client promptly and is counted."""

from __future__ import annotations

import socket
import time

import pytest

from tests.e2e.support import (
    KiB,
    Pattern,
    connect,
    recv_all,
    send_pattern,
    sink,
    source,
    wait_for,
)

PATHS = ("splice", "copy")


@pytest.mark.parametrize("path", PATHS)
def test_client_half_close_then_full_reply(standalone, origin, ports, path: str) -> None:  # type: ignore[no-untyped-def]
    """Client sends, shuts down its write side, and still receives the whole reply
    the origin only starts sending after it saw EOF."""
    reply = Pattern(300 * KiB + 7, seed=11)
    org = origin(sink(reply))
    port = ports.port()
    standalone(
        [{"name": "hc", "listen_port": port, "target": org.address}], splice=path == "splice"
    )
    request = Pattern(100 * KiB + 3, seed=12)
    with connect(port) as s:
        sent = send_pattern(s, request)
        # Taken before the call: a fast relay can hand the EOF to the origin thread
        # before this thread gets the GIL back from shutdown().
        shut_at = time.monotonic()
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s)
    rec = org.wait_connections(1)[0]
    assert rec.done.wait(10) and rec.error is None, rec.error
    assert rec.rx.count == sent.count and rec.rx.hexdigest() == sent.hexdigest()
    assert rec.extra["eof_at"] >= shut_at, "origin saw EOF before the client shut down"
    assert got.count == reply.size, f"client got {got.count} of {reply.size} reply bytes"
    assert got.hexdigest() == reply.digest()


@pytest.mark.parametrize("path", PATHS)
def test_origin_half_close_then_client_keeps_sending(standalone, origin, ports, path: str) -> None:  # type: ignore[no-untyped-def]
    """The origin sends its whole answer and shuts down its write side first; the
    client reads to EOF and only then sends its payload, which must still arrive."""
    answer = Pattern(200 * KiB, seed=21)
    org = origin(source(answer, then_read=True))
    port = ports.port()
    standalone(
        [{"name": "hc2", "listen_port": port, "target": org.address}], splice=path == "splice"
    )
    late = Pattern(150 * KiB + 1, seed=22)
    with connect(port) as s:
        got = recv_all(s)  # EOF = the origin's half-close, passed on
        assert got.count == answer.size and got.hexdigest() == answer.digest()
        sent = send_pattern(s, late)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b"", "connection should end once both sides shut down"
    rec = org.wait_connections(1)[0]
    assert rec.done.wait(10) and rec.error is None, rec.error
    assert rec.rx.count == late.size and rec.rx.hexdigest() == sent.hexdigest()


def test_refused_target_closes_client_promptly_and_counts(standalone, ports) -> None:  # type: ignore[no-untyped-def]
    dead = ports.port()  # reserved for us and nothing listens on it
    port = ports.port()
    proc = standalone(
        [{"name": "nowhere", "listen_port": port, "target": f"127.0.0.1:{dead}"}],
        settings={"connect_timeout_secs": 5},
    )
    before = proc.scrape().value("portunus_rule_connect_failures_total", rule="nowhere")
    assert before == 0
    with connect(port, timeout=5) as s:
        t0 = time.monotonic()
        try:
            data = s.recv(1)
        except ConnectionResetError:
            data = b""
        elapsed = time.monotonic() - t0
    assert data == b"", "client got bytes from a rule whose target is down"
    assert elapsed < 1.0, f"client closed only after {elapsed:.2f}s"
    wait_for(
        lambda: proc.scrape().value("portunus_rule_connect_failures_total", rule="nowhere") == 1,
        5,
        what="portunus_rule_connect_failures_total == 1",
    )
    m = proc.scrape()
    assert (
        m.value("portunus_rule_connect_failures_total", rule="nowhere", client="local", owner="")
        == 1
    )
    assert m.value("portunus_rule_bytes_in_total", rule="nowhere") == 0
    assert proc.wait_log("tcp.connect_failed", rule="nowhere")["error"] == "ECONNREFUSED"
