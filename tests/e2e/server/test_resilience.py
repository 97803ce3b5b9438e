"""Processes of the ``serve`` tree dying or stopping: a restart of ``serve``
re-applies every stored rule; a SIGKILLed control process comes back with the
rules intact while forwarding never stops; a SIGKILLed shard under a connect loop
costs no connect; a supervisor that does not answer in time gives ``ack_timeout``
(exit 7 / 504) with the rule left pending, and the late answer activates it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator

import psutil

from tests.e2e.server.loops import EchoLoop
from tests.e2e.support import (
    ServerProc,
    connect,
    connection_refused,
    echo,
    echo_roundtrip,
    recv_exact,
    wait_for,
)


def _states(srv: ServerProc) -> dict[int, str]:
    return {rid: r["state"] for rid, r in srv.rules().items()}


def test_restart_reapplies_every_stored_rule(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv = server(shards=2)
    orgs = [origin(echo) for _ in range(3)]
    listen = ports.ports(4)
    ids = [
        srv.cli_json("push-rule", "local", str(p), o.address)["id"]
        for p, o in zip(listen, orgs, strict=False)
    ]
    # A fourth rule fails (foreign socket on its port), then its port is freed while down.
    foreign = socket.socket()
    foreign.bind(("127.0.0.1", listen[3]))
    foreign.listen()
    failed = srv.cli("push-rule", "local", str(listen[3]), orgs[0].address, "--format", "json")
    assert failed.returncode == 6, failed.stderr
    failed_id = int(json.loads(failed.stdout)["id"])
    # A removed rule must stay removed.
    gone = srv.cli_json("push-rule", "local", str(ports.port()), orgs[0].address)["id"]
    srv.cli_json("remove-rule", str(gone))
    wait_for(lambda: gone not in srv.rules(), 5, what="removed rule deleted")
    before = srv.rules()

    rc = srv.stop(signal.SIGTERM, timeout=20)
    assert rc == 0, srv.stderr_tail()
    for p in listen[:3]:
        assert connection_refused(p), f"port {p} still open after serve stopped"
    foreign.close()
    srv.start()
    srv.wait_ready()

    ready = srv.wait_log("supervisor.ready", since=srv.start_mark)
    assert ready["rules"] == 4 and ready["failed"] == 0, ready
    after = srv.rules()
    assert sorted(after) == sorted(before) == sorted([*ids, failed_id])
    assert _states(srv) == {rid: "active" for rid in after}, after
    for rid in after:
        for key in ("listen_port", "targets", "created_at", "client_id"):
            assert after[rid][key] == before[rid][key], (rid, key)
    for p in listen:
        assert echo_roundtrip(p), f"no echo through port {p} after restart"
    # The restarted server accepts new work and its ids do not reuse old ones.
    new = srv.cli_json("push-rule", "local", str(ports.port()), orgs[1].address)
    assert new["state"] == "active" and new["id"] > max([*after, gone])


def test_sigkill_control_never_interrupts_forwarding(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv = server(shards=2)
    org = origin(echo)
    port = ports.port()
    rid = srv.cli_json("push-rule", "local", str(port), org.address)["id"]
    before = srv.rules()
    shards_before = {i: p.pid for i, p in srv.shards().items()}
    control = srv.child("control")
    assert control is not None
    long_lived = connect(port)
    try:
        long_lived.sendall(b"before\n")
        assert recv_exact(long_lived, 7) == b"before\n"
        with EchoLoop(port, threads=2) as loop:
            loop.wait_ok(100)
            mark = srv.log_mark()
            os.kill(control.pid, signal.SIGKILL)
            loop.mark()
            new = wait_for(
                lambda: (c := srv.child("control")) is not None and c.pid != control.pid and c,
                10,
                what="a new control process",
            )
            wait_for(srv.health_ok, 10, what="/v1/health after the control restart")
            back_at = time.monotonic()
            # Keep the loop running past the restart, then a while longer.
            loop.wait_ok(200, after_mark=True)
            while time.monotonic() - back_at < 1.0:
                time.sleep(0.05)
            stats = loop.stop()
        assert stats.failures == 0, (
            f"forwarding was interrupted: {len(stats.connect_failures)} connect failures "
            f"{stats.connect_failures[:3]}, resets {stats.resets[:3]}, other {stats.other[:3]}"
        )
        assert stats.ok_after_mark >= 200
        long_lived.sendall(b"after\n")
        assert recv_exact(long_lived, 6) == b"after\n", (
            "an open connection was cut by the control restart"
        )
    finally:
        long_lived.close()

    rec = srv.wait_log("child.restarting", since=mark, child="control")
    assert rec["how"] == "signal SIGKILL"
    assert new.pid != control.pid
    assert {i: p.pid for i, p in srv.shards().items()} == shards_before, (
        "the data plane was restarted"
    )
    assert srv.rules() == before, "rules changed across the control restart"
    # The new control process is linked to the supervisor: push and remove work.
    org2 = origin(echo)
    port2 = ports.port()
    rule2 = srv.cli_json("push-rule", "local", str(port2), org2.address)
    assert rule2["state"] == "active" and echo_roundtrip(port2)
    srv.cli_json("remove-rule", str(rule2["id"]))
    wait_for(lambda: connection_refused(port2), 5, what="removed rule's port freed")
    wait_for(lambda: rule2["id"] not in srv.rules(), 5, what="removed rule deleted")
    assert srv.rules()[rid]["state"] == "active"


def test_sigkill_shard_under_load_no_failed_connect(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv = server(shards=2)
    org = origin(echo)
    port = ports.port()
    rid = srv.cli_json("push-rule", "local", str(port), org.address)["id"]
    victim = srv.shards()[0]
    survivor = srv.shards()[1]
    threads = 4
    with EchoLoop(port, threads=threads) as loop:
        loop.wait_ok(200)
        os.kill(victim.pid, signal.SIGKILL)
        loop.mark()
        killed_at = time.monotonic()
        wait_for(
            lambda: (s := srv.shards().get(0)) is not None and s.pid != victim.pid,
            5,
            what="shard 0 respawned",
        )
        loop.wait_ok(300, after_mark=True)
        while time.monotonic() - killed_at < 1.5:
            time.sleep(0.05)
        stats = loop.stop()
    print(f"shard kill loop: ok={stats.ok} after={stats.ok_after_mark} resets={len(stats.resets)}")
    assert stats.connect_failures == [], (
        f"connects failed while the shard restarted: {stats.connect_failures[:5]}"
    )
    assert stats.other == [], stats.other[:5]
    # Only connections in flight on the killed shard at that instant may be cut.
    assert len(stats.resets) <= threads, stats.resets[:5]
    assert srv.shards()[1].pid == survivor.pid
    assert srv.rules()[rid]["state"] == "active"
    wait_for(
        lambda: srv.scrape().value("portunus_shard_restarts_total", shard="0") == 1,
        5,
        what="portunus_shard_restarts_total{shard=0} == 1",
    )
    total = srv.rpc("rules.stats", {"id": rid})["connections_total"]
    assert total >= stats.ok_after_mark, f"stats lost the killed shard's successors: {total}"


@contextlib.contextmanager
def stopped(proc: psutil.Process) -> Iterator[None]:
    """SIGSTOP ``proc`` for the block; SIGCONT whatever happens."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_ack_timeout_leaves_pending_then_late_answer_activates(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    """A stopped supervisor cannot answer: the push times out (exit 7 / 504) with the
    rule stored as pending; on SIGCONT the late answers make both rules active.
    The supervisor is stopped ~1-2 s, well under the 10 s shard heartbeat budget."""
    srv = server(shards=1)
    org = origin(echo)
    p_cli, p_http = ports.ports(2)
    supervisor = psutil.Process(srv.pid)
    with stopped(supervisor):
        t0 = time.monotonic()
        res = srv.cli(
            "push-rule",
            "local",
            str(p_cli),
            org.address,
            "--ack-timeout",
            "0.5",
            "--format",
            "json",
        )
        took = time.monotonic() - t0
        resp = srv.http(
            "POST",
            "/v1/rules?ack_timeout=0.5",
            {
                "client": "local",
                "listen_port": p_http,
                "targets": [{"host": "127.0.0.1", "port": org.port}],
            },
        )
        pending = _states(srv)
    assert res.returncode == 7, (res.returncode, res.stderr)
    assert res.stderr.startswith("error: ack_timeout: "), res.stderr
    assert took < 3.0, f"--ack-timeout 0.5 took {took:.2f}s"
    cli_rule = json.loads(res.stdout)
    assert cli_rule["state"] == "pending"
    assert resp.status == 504 and resp.error_code == "ack_timeout", resp
    http_rule = resp.json()["error"]["rule"]
    assert http_rule["state"] == "pending"
    assert pending[cli_rule["id"]] == "pending" and pending[http_rule["id"]] == "pending"

    wait_for(
        lambda: (
            _states(srv).get(cli_rule["id"]) == "active"
            and _states(srv).get(http_rule["id"]) == "active"
        ),
        5,
        what=lambda: f"both rules active after SIGCONT ({_states(srv)})",
    )
    assert echo_roundtrip(p_cli) and echo_roundtrip(p_http)
    assert srv.alive() and len(srv.shards()) == 1
