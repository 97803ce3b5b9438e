"""``serve`` and its children under the one halt policy: an own listener that
cannot be bound fails the start (exit 73) naming the address and the key, with
no READY=1 and no process left; a child that cannot start halts the service
(exit 70); a child that keeps dying after good starts halts it (exit 75) with one
``supervisor.halt`` line, instead of being respawned forever while READY."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from tests.e2e.support import FakeNotify, ServerProc, wait_for
from tests.e2e.support.faults import faults_env


@pytest.fixture
def notify() -> Iterator[FakeNotify]:
    fake = FakeNotify()
    yield fake
    fake.close()


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("key", ["operator_http_listen", "metrics_listen", "control_listen"])
def test_busy_own_port_fails_serve_at_start(server, notify: FakeNotify, key: str) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(shards=1, start=False, env={"NOTIFY_SOCKET": notify.path})
    host, port = srv.settings[key].rsplit(":", 1)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((host, int(port)))
        squatter.listen()
        srv.start()
        rc = srv.wait_exit(15)
    err = srv.stderr_text()
    assert rc == 73, f"serve exited {rc}\n{srv.stderr_tail()}"
    line = next(ln for ln in err.splitlines() if ln.startswith("error: listen_failed:"))
    assert f"{host}:{port}" in line and key in line and str(srv.config_path) in line, line
    assert srv.events("supervisor.ready") == []
    assert notify.count("READY") == 0
    wait_for(lambda: _group_gone(srv.pid), 5, what="no process left of the refused start")


def test_shard_that_cannot_start_halts_serve_without_ready(server, notify: FakeNotify) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProc = server(
        shards=2, start=False, env={"NOTIFY_SOCKET": notify.path, **faults_env("shard_boot")}
    )
    srv.start()
    rc = srv.wait_exit(20)
    assert rc == 70, f"serve exited {rc}\n{srv.stderr_tail()}"
    halts = srv.events("supervisor.halt")
    assert len(halts) == 1, halts
    assert halts[0]["child"].startswith("shard-") and "could not start" in halts[0]["reason"]
    assert halts[0]["exit_code"] == 70
    assert srv.events("shard.restarted") == [], "a shard that cannot start was respawned"
    assert notify.count("READY") == 0, "READY=1 although a shard never came up"
    wait_for(lambda: _group_gone(srv.pid), 5, what="no process left")


def test_web_crash_loop_halts_serve(server) -> None:  # type: ignore[no-untyped-def]
    """Kill the web child after each good start: the fifth death within the window
    halts serve with 75 and one line naming the child, instead of respawning forever."""
    srv: ServerProc = server(shards=1)
    seen: set[int] = set()
    for _ in range(5):
        web = wait_for(
            lambda: (w := srv.child("web")) is not None and w.pid not in seen and w,
            10,
            what=lambda: "a new web process\n" + srv.stderr_tail(),
        )
        wait_for(srv.health_ok, 10, what="the API answers (web is up)")
        seen.add(web.pid)
        os.kill(web.pid, signal.SIGKILL)
        time.sleep(0.05)
    rc = srv.wait_exit(20)
    assert rc == 75, f"serve exited {rc}\n{srv.stderr_tail()}"
    [halt] = srv.events("supervisor.halt")
    assert (
        halt["child"] == "web" and halt["exit_code"] == 75 and "died 5 times" in halt["reason"]
    ), halt
    assert len(srv.events("child.restarting", child="web")) == 4
    wait_for(lambda: _group_gone(srv.pid), 5, what="no process left")


def test_a_single_web_death_is_respawned_on_the_same_socket(server) -> None:  # type: ignore[no-untyped-def]
    """One death is not a loop: web comes back, serving the socket the supervisor
    kept, and a request sent while it was down waits instead of being refused."""
    srv: ServerProc = server(shards=1)
    web = srv.child("web")
    assert web is not None
    os.kill(web.pid, signal.SIGKILL)
    resp = srv.http("GET", "/v1/health", token=None, timeout=20)  # may land in the accept queue
    assert resp.status == 200
    assert srv.alive()
    new = srv.child("web")
    assert new is not None and new.pid != web.pid
