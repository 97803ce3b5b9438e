"""SIGHUP re-reads the TOML file and applies only the difference.

Added rules bind and forward, removed rules stop accepting and drain their open
connections (up to shutdown_drain_timeout_secs), unchanged rules keep their open
connections, and an invalid file changes nothing at all.
"""

from __future__ import annotations

import socket
import time

from tests.e2e.support import (
    connect,
    connection_refused,
    echo,
    echo_roundtrip,
    recv_exact,
    wait_for,
)

DRAIN = 3  # shutdown_drain_timeout_secs: also how long a removed rule drains


def roundtrip_on(s: socket.socket, payload: bytes) -> bytes:
    s.sendall(payload)
    return recv_exact(s, len(payload))


def test_sighup_adds_removes_and_keeps_unchanged(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    keep_o, gone_o, new_o, old_t, new_t = (origin(echo) for _ in range(5))
    keep_p, gone_p, new_p, move_p = ports.ports(4)
    keep = {"name": "keep", "listen_port": keep_p, "target": keep_o.address}
    gone = {"name": "gone", "listen_port": gone_p, "target": gone_o.address}
    moved_before = {"name": "moved", "listen_port": move_p, "target": old_t.address}
    proc = standalone(
        [keep, gone, moved_before], shards=2, settings={"shutdown_drain_timeout_secs": DRAIN}
    )
    assert connection_refused(new_p)

    keep_conn = connect(keep_p)
    gone_conn = connect(gone_p)
    moved_conn = connect(move_p)
    try:
        assert roundtrip_on(keep_conn, b"before\n") == b"before\n"
        assert roundtrip_on(gone_conn, b"before\n") == b"before\n"
        assert roundtrip_on(moved_conn, b"before\n") == b"before\n"

        added = {"name": "added", "listen_port": new_p, "target": new_o.address}
        moved_after = {**moved_before, "target": new_t.address}
        proc.write_config(rules=[keep, moved_after, added])
        reloaded_at = time.monotonic()
        rec = proc.reload("config.reloaded")
        assert rec["rules"] == 3

        # Added: binds and forwards.
        wait_for(lambda: echo_roundtrip(new_p), 5, what="the added rule to forward")
        assert len(new_o.records) >= 1
        # Removed: refuses new connections...
        wait_for(lambda: connection_refused(gone_p), 5, what="the removed rule's port to refuse")
        # ...while its open connection drains (still relays) ...
        assert roundtrip_on(gone_conn, b"draining\n") == b"draining\n"
        assert time.monotonic() - reloaded_at < DRAIN, "too slow to observe the drain window"
        # Unchanged: the open connection carries on, on the same origin connection.
        assert roundtrip_on(keep_conn, b"after\n") == b"after\n"
        assert len(keep_o.records) == 1
        assert echo_roundtrip(keep_p)
        # Changed target, same port: the open connection stays on the old target,
        # new connections go to the new one.
        assert roundtrip_on(moved_conn, b"after\n") == b"after\n"
        assert len(old_t.records) == 1
        assert echo_roundtrip(move_p)
        assert len(new_t.records) == 1 and len(old_t.records) == 1

        # ... and the removed rule's open connection is cut after the drain timeout.
        gone_conn.settimeout(10)
        try:
            tail = gone_conn.recv(1)
        except ConnectionResetError:
            tail = b""
        assert tail == b""
        cut_after = time.monotonic() - reloaded_at
        assert DRAIN - 0.5 <= cut_after < DRAIN + 3.0, (
            f"drain of the removed rule ended after {cut_after:.2f}s (timeout {DRAIN}s)"
        )
        # The unchanged rule's connection was not part of that drain.
        assert roundtrip_on(keep_conn, b"still\n") == b"still\n"
    finally:
        for s in (keep_conn, gone_conn, moved_conn):
            s.close()
    assert proc.alive()


def test_invalid_reload_changes_nothing(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    a_o, b_o = origin(echo), origin(echo)
    a_p, b_p, c_p = ports.ports(3)
    a = {"name": "a", "listen_port": a_p, "target": a_o.address}
    b = {"name": "b", "listen_port": b_p, "target": b_o.address}
    proc = standalone([a, b], shards=2)
    open_conn = connect(a_p)
    try:
        assert roundtrip_on(open_conn, b"x\n") == b"x\n"
        # Drops b, adds c, but also carries an error: nothing of it may be applied.
        proc.write_config(
            rules=[a, {"name": "c", "listen_port": c_p, "target": b_o.address, "bogus": 1}]
        )
        rec = proc.reload("config.invalid")
        assert any(f"{proc.config_path}:" in e and "bogus" in e for e in rec["errors"]), rec
        assert rec["level"] == "error"
        for port in (a_p, b_p):
            assert echo_roundtrip(port), f"port {port} stopped forwarding after an invalid reload"
        assert connection_refused(c_p), "a rule from the invalid file was bound"
        assert roundtrip_on(open_conn, b"y\n") == b"y\n"

        # A TOML syntax error is refused the same way.
        proc.write_raw(proc.config_path.read_text() + "\n[[rule]\n")
        rec = proc.reload("config.invalid")
        assert "TOML syntax error" in " ".join(rec["errors"])
        assert echo_roundtrip(a_p) and echo_roundtrip(b_p)

        # Fixing the file and reloading again applies it.
        proc.write_config(rules=[a, {"name": "c", "listen_port": c_p, "target": b_o.address}])
        proc.reload("config.reloaded")
        wait_for(lambda: connection_refused(b_p), 5, what="b to be removed")
        assert echo_roundtrip(c_p)
        assert roundtrip_on(open_conn, b"z\n") == b"z\n"
    finally:
        open_conn.close()
    assert proc.alive()


def test_rule_changing_relay_path_keeps_open_connections(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    """A plain rule (native relay where built) gains a rate limit (Python relay) and
    loses it again: open connections carry on across both switches on the path they
    started on, and new connections are served on the new path each time."""
    o = origin(echo)
    port = ports.port()
    plain = {"name": "switch", "listen_port": port, "target": o.address}
    capped = {**plain, "rate_limit": {"concurrent_connections": 100}}
    proc = standalone([plain], shards=1)
    first = connect(port)
    second = None
    try:
        assert roundtrip_on(first, b"plain\n") == b"plain\n"
        proc.write_config(rules=[capped])
        proc.reload("config.reloaded")
        second = connect(port)
        assert roundtrip_on(second, b"capped\n") == b"capped\n"
        assert roundtrip_on(first, b"still plain\n") == b"still plain\n"
        proc.write_config(rules=[plain])
        proc.reload("config.reloaded")
        assert echo_roundtrip(port)
        assert roundtrip_on(first, b"first\n") == b"first\n"
        assert roundtrip_on(second, b"second\n") == b"second\n"
        big = bytes(range(256)) * 1024  # 256 KiB: past the copy-first bytes on both paths
        assert roundtrip_on(first, big) == big and roundtrip_on(second, big) == big
    finally:
        first.close()
        if second is not None:
            second.close()
    assert proc.alive()
