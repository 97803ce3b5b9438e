"""Starting ``serve``: sd_notify READY=1 is sent once, and only when /v1/health
answers and the stored rules are bound; a database written by a newer Portunus
stops the service with exit 78 and a clear message, leaving no process behind."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

from tests.e2e.support import (
    FakeNotify,
    ServerProc,
    connection_refused,
    echo,
    echo_roundtrip,
    listening_ports,
    wait_for,
)


@pytest.fixture
def notify() -> FakeNotify:  # type: ignore[misc]
    fake = FakeNotify()
    yield fake
    fake.close()


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _push_stored_rules(srv: ServerProc, origin, ports) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """Three single-port rules to an echo origin and one 3-port range rule; returns
    (single ports, every bound port)."""
    org = origin(echo)
    listen = ports.ports(3)
    rng = ports.block(3)
    for p in listen:
        assert srv.cli_json("push-rule", "local", str(p), org.address)["state"] == "active"
    # A range rule: all of its ports must be bound at READY too (no traffic sent to it).
    assert (
        srv.cli_json("push-rule", "local", f"{rng}-{rng + 2}", "127.0.0.1:9-11")["state"]
        == "active"
    )
    return listen, [*listen, rng, rng + 1, rng + 2]


def _wait_new_ready(srv: ServerProc, notify: FakeNotify, seen: int) -> None:
    """Spin until a READY=1 beyond the first ``seen`` arrives (no sleep: the
    checks that follow must run as close to READY as possible)."""
    deadline = time.monotonic() + 20
    while notify.count("READY") <= seen:
        assert srv.alive(), srv.stderr_tail()
        assert time.monotonic() < deadline, f"no READY=1 within 20 s\n{srv.stderr_tail()}"
        time.sleep(0.001)


def test_ready_once_stored_rules_are_bound(server, origin, ports, notify: FakeNotify) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=2)
    listen, bound = _push_stored_rules(srv, origin, ports)
    assert srv.stop() == 0

    srv.env["NOTIFY_SOCKET"] = notify.path
    srv.start()
    _wait_new_ready(srv, notify, 0)
    bound_at_ready = listening_ports()  # READY=1 just arrived: no retry from here
    missing = [p for p in bound if p not in bound_at_ready]
    assert not missing, f"READY=1 before stored rules were bound: ports {missing} not listening"
    ready = next(m for m in notify.messages if m.get("READY") == "1")
    assert ready.get("MAINPID") == str(srv.pid)
    assert ready.get("STATUS") == "forwarding 4 rule(s) on 2 shard(s)", ready

    srv.wait_ready()
    assert {r["state"] for r in srv.rules().values()} == {"active"}
    for p in listen:
        assert echo_roundtrip(p)
    time.sleep(0.5)  # READY is sent once per start, not repeated by later ticks
    assert notify.count("READY") == 1, notify.messages
    srv.send_signal(signal.SIGTERM)
    notify.wait("STOPPING")
    assert srv.wait_exit(20) == 0


RESTARTS = 8  # ~60 % of starts show the race today: 8 make an accidental pass very unlikely


def test_ready_only_once_health_answers(server, origin, ports, notify: FakeNotify) -> None:  # type: ignore[no-untyped-def]
    """Sampled over several restarts (the gap is a race of a few ms): at every
    READY=1, /v1/health must already answer 200 and the API must list the rules."""
    srv: ServerProc = server(shards=1)
    _push_stored_rules(srv, origin, ports)
    want = {rid: "active" for rid in srv.rules()}
    assert srv.stop() == 0
    srv.env["NOTIFY_SOCKET"] = notify.path
    bad: list[str] = []
    for i in range(RESTARTS):
        srv.start()
        _wait_new_ready(srv, notify, i)
        health = srv.http("GET", "/v1/health", token=None)
        if health.status != 200:
            bad.append(f"start {i}: /v1/health {health}")
        else:
            states = {rid: r["state"] for rid, r in srv.rules().items()}
            if states != want:
                bad.append(f"start {i}: rules at READY {states}")
        srv.wait_ready()
        assert srv.stop() == 0
    assert notify.count("READY") == RESTARTS
    assert bad == [], "\n".join(bad)


def test_newer_schema_exits_78(server, ports) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=1)
    srv.cli_json("push-rule", "local", str(ports.port()), "127.0.0.1:9")
    assert srv.stop() == 0
    with sqlite3.connect(srv.db_path) as db:
        (version,) = db.execute("SELECT version FROM schema_version").fetchone()
        db.execute("UPDATE schema_version SET version = ?", (version + 1,))
    mark = srv.log_mark()
    srv.start()
    rc = srv.wait_exit(15)
    out = srv.stderr_text()
    assert rc == 78, f"serve exited {rc}\n{srv.stderr_tail()}"
    assert "schema" in out and str(version + 1) in out, (
        f"the message must name the schema version:\n{out[-2000:]}"
    )
    assert srv.events("supervisor.ready", since=mark) == []
    wait_for(lambda: _group_gone(srv.pid), 5, what="no process left of the refused start")
    assert connection_refused(srv.api_port), "the API answered although serve refused to start"
    with sqlite3.connect(srv.db_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchone() == (version + 1,), (
            "a refused start must not touch the database"
        )


def test_newer_schema_under_a_running_server_halts_with_78(server, ports) -> None:  # type: ignore[no-untyped-def]
    """The schema moves ahead while serving (another, newer binary migrated it) and
    the control process restarts: it must refuse, and the supervisor must stop the
    service with 78 instead of respawning control forever."""
    srv: ServerProc = server(shards=1)
    with sqlite3.connect(srv.db_path, timeout=10) as db:
        (version,) = db.execute("SELECT version FROM schema_version").fetchone()
        db.execute("UPDATE schema_version SET version = ?", (version + 1,))
    control = srv.child("control")
    assert control is not None
    os.kill(control.pid, signal.SIGKILL)
    rc = srv.wait_exit(8)
    assert rc == 78, f"serve exited {rc}\n{srv.stderr_tail()}"
    assert len(srv.events("child.started", child="control")) == 2, (
        "control was respawned more than once"
    )
    wait_for(lambda: _group_gone(srv.pid), 5, what="no process left after the halt")
