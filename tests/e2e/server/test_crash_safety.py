"""kill -9 at the worst moments: the database stays intact and consistent, and no
acknowledged rule is lost.

- control killed between *stored* (the rule is committed as pending) and *acked*
  (the data plane's answer): the restarted control re-applies the rule.
- the web process killed while requests wait on control: the rules those requests
  pushed complete anyway, every answered push is there.
- the supervisor killed while rules are pushed and traffic flows: after a fresh
  start every acknowledged rule is back and forwarding.

After each: ``PRAGMA integrity_check`` is ``ok``, foreign keys hold, every rule has
its targets and a known state, and every rule settles to ``active``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from portunus.errors import PortunusError
from tests.e2e.server.loops import EchoLoop
from tests.e2e.support import ServerProc, echo, echo_roundtrip, wait_for

STATES = {"pending", "active", "failed", "draining"}


def check_database(db_path: Path) -> dict[int, str]:
    """Integrity and consistency of a state.db no process is writing; ``{id: state}``."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        rules = dict(conn.execute("SELECT id, state FROM rules").fetchall())
        targets = dict(
            conn.execute("SELECT rule_id, count(*) FROM rule_targets GROUP BY rule_id").fetchall()
        )
        for rid, state in rules.items():
            assert state in STATES, (rid, state)
            assert targets.get(rid, 0) >= 1, f"rule {rid} was stored without its targets"
        orphans = set(targets) - set(rules)
        assert not orphans, f"targets of rules that do not exist: {orphans}"
        audited = {
            int(t.split(":")[1])
            for (t,) in conn.execute(
                "SELECT target FROM audit WHERE action = 'rule.push' AND outcome = 'ok'"
            )
        }
        assert set(rules) <= audited, f"rules without their audit row: {set(rules) - audited}"
        return rules
    finally:
        conn.close()


@contextlib.contextmanager
def stopped(proc: psutil.Process) -> Iterator[None]:
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)


def body(port: int, target: int) -> dict[str, Any]:
    return {
        "client": "local",
        "listen_port": port,
        "targets": [{"host": "127.0.0.1", "port": target}],
    }


def all_active(srv: ServerProc) -> dict[int, dict[str, Any]]:
    """Every rule, once all are active; ``{}`` before (or while control restarts)."""
    try:
        rules = srv.rules()
    except (PortunusError, OSError):
        return {}
    return rules if rules and all(r["state"] == "active" for r in rules.values()) else {}


def stop_and_check(srv: ServerProc) -> dict[int, str]:
    rc = srv.stop(signal.SIGTERM, timeout=30)
    assert rc == 0, srv.stderr_tail()
    return check_database(srv.db_path)


def test_kill_control_between_stored_and_acked(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv = server(shards=1)
    org = origin(echo)
    port = ports.port()
    control = srv.child("control")
    assert control is not None
    answer: dict[str, Any] = {}
    with stopped(psutil.Process(srv.pid)):  # the supervisor cannot ack while stopped
        pusher = threading.Thread(
            target=lambda: answer.update(
                res=srv.cli("push-rule", "local", str(port), org.address, "--ack-timeout", "30")
            ),
            daemon=True,
        )
        pusher.start()
        # Stored: the rule is committed as pending before it is sent.
        wait_for(
            lambda: any(r["state"] == "pending" for r in srv.rules().values()),
            10,
            what="the push committed as pending",
        )
        os.kill(control.pid, signal.SIGKILL)
        pusher.join(15)
    assert answer["res"].returncode != 0, "a push whose control died cannot have been acknowledged"
    wait_for(
        lambda: (c := srv.child("control")) is not None and c.pid != control.pid,
        15,
        what="a new control process",
    )
    [rid] = wait_for(
        lambda: all_active(srv), 15, what=lambda: f"the stored rule re-applied: {srv.rules()}"
    )
    assert echo_roundtrip(port), "the re-applied rule does not forward"
    assert stop_and_check(srv) == {rid: "active"}


def test_kill_web_mid_request(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv = server(shards=1)
    org = origin(echo)
    acked = srv.http("POST", "/v1/rules", body(ports.port(), org.port))
    assert acked.status == 201, acked
    web = srv.child("web")
    assert web is not None
    listen = ports.ports(3)
    answers: list[Any] = []

    def push(port: int) -> None:
        try:
            answers.append(
                srv.http("POST", "/v1/rules?ack_timeout=30", body(port, org.port), timeout=30)
            )
        except OSError as exc:  # the web process died under the request
            answers.append(exc)

    with stopped(psutil.Process(srv.pid)):
        threads = [threading.Thread(target=push, args=(p,), daemon=True) for p in listen]
        for t in threads:
            t.start()
        wait_for(
            lambda: sum(r["state"] == "pending" for r in srv.rules().values()) == 3,
            10,
            what=lambda: f"three pushes waiting for their ack: {srv.rules()}",
        )
        os.kill(web.pid, signal.SIGKILL)
        for t in threads:
            t.join(15)
    assert len(answers) == 3 and all(isinstance(a, OSError) for a in answers), answers
    wait_for(
        lambda: (w := srv.child("web")) is not None and w.pid != web.pid,
        15,
        what="a new web process",
    )
    wait_for(srv.health_ok, 15, what="/v1/health after the web restart")
    # The requests died with the web process, but control stored and applied the rules.
    rules = wait_for(
        lambda: len(all_active(srv)) == 4 and all_active(srv),
        15,
        what=lambda: f"every rule active: {srv.rules()}",
    )
    assert acked.json()["id"] in rules
    assert set(listen) <= {r["listen_port"] for r in rules.values()}
    for p in listen:
        assert echo_roundtrip(p)
    assert set(stop_and_check(srv).values()) == {"active"}


def test_kill_supervisor_under_load(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv = server(shards=2)
    org = origin(echo)
    base_port = ports.port()
    assert srv.http("POST", "/v1/rules", body(base_port, org.port)).status == 201
    acked: list[int] = []
    stop = threading.Event()
    free = iter(ports.ports(60))

    def pusher() -> None:
        while not stop.is_set():
            try:
                r = srv.http("POST", "/v1/rules", body(next(free), org.port), timeout=10)
            except (OSError, StopIteration):
                return
            if r.status == 201:
                acked.append(r.json()["id"])

    tree = psutil.Process(srv.pid).children(recursive=True)
    with EchoLoop(base_port, threads=2) as loop:
        loop.wait_ok(50)
        threads = [threading.Thread(target=pusher, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: len(acked) >= 5, 30, what="a few acknowledged pushes")
        os.kill(srv.pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(15)
    assert srv.wait_exit(5) == -signal.SIGKILL
    # The children notice (PDEATHSIG) and go; wait until none is left holding state.db.
    psutil.wait_procs(tree, timeout=30)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    stored = check_database(srv.db_path)
    missing = set(acked) - set(stored)
    assert not missing, f"acknowledged rules lost: {missing}"

    srv.start()
    srv.wait_ready(30)
    rules = wait_for(
        lambda: all_active(srv), 20, what=lambda: f"every rule active again: {srv.rules()}"
    )
    assert set(acked) <= set(rules)
    assert set(rules) == set(stored)
    assert echo_roundtrip(base_port)
    for rid in acked[-3:]:
        assert echo_roundtrip(rules[rid]["listen_port"]), rid
    assert set(stop_and_check(srv).values()) == {"active"}
