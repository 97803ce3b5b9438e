"""run_control in a real child process, with this test playing the supervisor."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portunus.control.rpc.caller import call_sync
from portunus.control.store.migrations import connect_sync, migrate
from portunus.ipc.framing import Channel
from portunus.ipc.messages import as_dict
from portunus.ipc.messages import from_dict as message
from tests.integration.spawn import free_port, spawn_control

TOKEN = "process-test-operator-token-abcdefghijklmnopqrstuvwxyz"


def read_frames(chan: Channel, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Frames from ``chan``; a selector, not select(): the e2e tests before this one
    hold their reserved ports' locks for the whole session, so fds exceed 1023."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(chan.fileno(), selectors.EVENT_READ)
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(got)} of {n} frames: {got}")
            sel.select(left)
            got += [as_dict(m) for m, _ in chan.read()]
    return got


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class Control:
    def __init__(self, base: Path) -> None:
        self.data = base / "data"
        self.run = base / "run"
        self.metrics = self.run / "metrics"
        self.metrics.mkdir(parents=True)
        self.sock_path = str(self.run / "control.sock")
        # The edge gateway binds here: loopback and a free port, never the default 0.0.0.0:7443.
        self.control_listen = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: Channel | None = None

    def seed_rule(self, port: int, state: str = "active") -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        db = str(self.data / "state.db")
        conn = connect_sync(db)
        migrate(conn, db)
        rid = conn.execute(
            "INSERT INTO rules (client_id, protocol, listen_start, listen_end, state, created_at) "
            "VALUES ('local', 'tcp', ?, ?, ?, '2024-01-01T00:00:00.000Z')",
            (port, port, state),
        ).lastrowid
        conn.execute(
            "INSERT INTO rule_targets (rule_id, position, host, port, priority) VALUES (?, 0, '127.0.0.1', 9, 1)",
            (rid,),
        )
        conn.close()

    def start(self) -> None:
        self.proc, ours = spawn_control(self.data, self.run, TOKEN, self.control_listen)
        self.chan = Channel(ours)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return call_sync(self.sock_path, TOKEN, method, params, timeout=10)

    def stop(self) -> tuple[int, list[dict[str, Any]]]:
        assert self.proc is not None
        _, err = self.proc.communicate(timeout=10)
        lines = [json.loads(x) for x in err.decode().splitlines() if x.startswith("{")]
        return self.proc.returncode, lines


@pytest.fixture
def control(short_dir: Path) -> Iterator[Control]:
    c = Control(short_dir)
    yield c
    if c.proc is not None and c.proc.poll() is None:
        c.proc.kill()
        c.proc.wait()
    if c.chan is not None:
        c.chan.close()


def test_sync_push_and_sigterm(control: Control) -> None:
    control.seed_rule(30100)
    control.seed_rule(30099, state="draining")  # left by a control process that died
    control.start()
    assert control.chan is not None and control.proc is not None
    caps, sync = read_frames(control.chan, 2)
    assert caps == {"type": "owner_caps", "caps": {}}  # the node's full set, before the rules
    assert sync["type"] == "sync" and [r["id"] for r in sync["rules"]] == ["1"]
    assert sync["rules"][0]["listen_start"] == 30100 and sync["rules"][0]["client"] == "local"
    control.chan.send(message({"type": "hello", "version": 1, "shards": 1}))
    control.chan.send(
        message(
            {
                "type": "applied",
                "seq": sync["seq"],
                "results": {"1": {"state": "active", "reason": None}},
            }
        )
    )
    wait_until(lambda: os.path.exists(control.sock_path))
    assert control.call("health") == {"status": "ok"}
    assert control.call("auth.whoami")["user"] == "operator"
    (up,) = read_frames(control.chan, 1)
    assert up == {"type": "up"}, "control says up once its socket and gateway serve"

    result: dict[str, Any] = {}

    def push() -> None:
        result["rule"] = control.call(
            "rules.push", {"listen_port": 30101, "targets": [{"host": "127.0.0.1", "port": 9}]}
        )

    t = threading.Thread(target=push)
    t.start()
    (apply,) = read_frames(control.chan, 1)
    assert apply["type"] == "apply" and apply["upsert"][0]["id"] == "3"
    control.chan.send(
        message(
            {
                "type": "applied",
                "seq": apply["seq"],
                "results": {"3": {"state": "active", "reason": None}},
            }
        )
    )
    t.join(10)
    assert result["rule"]["state"] == "active" and result["rule"]["id"] == 3
    assert [r["id"] for r in control.call("rules.list")["rules"]] == [1, 3]
    assert any(p.name.startswith("gauge_livemostrecent_") for p in control.metrics.iterdir())

    control.proc.send_signal(signal.SIGTERM)
    code, logs = control.stop()
    assert code == 0
    assert not os.path.exists(control.sock_path)
    events = [line["event"] for line in logs]
    assert "rule.pushed" in events and "rule.activated" in events
    assert all(line.get("process") == "control" for line in logs)
    assert TOKEN not in json.dumps(logs)


def test_exits_when_supervisor_goes_away(control: Control) -> None:
    control.start()
    assert control.chan is not None
    read_frames(control.chan, 2)  # the owner caps and the initial (empty) sync
    wait_until(lambda: os.path.exists(control.sock_path))
    control.chan.close()
    control.chan = None
    code, logs = control.stop()
    assert code == 0
    stopped = [line for line in logs if line["event"] == "control.stopped"]
    assert stopped and "supervisor channel" in stopped[0]["reason"]
