"""``portunus-standalone`` under the one halt policy, and ``stats`` reading only
its own instance: a busy metrics port fails the start (73, naming the key); a
shard that cannot start halts it (70) with no READY=1; a shard that keeps dying
after good starts halts it (75); ``stats`` refuses another process's /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e.support import LOOPBACK, FakeNotify, echo, wait_for
from tests.e2e.support.faults import faults_env
from tests.e2e.support.standalone import STANDALONE_BIN, StandaloneProc


@pytest.fixture
def notify() -> Iterator[FakeNotify]:
    fake = FakeNotify()
    yield fake
    fake.close()


def _rule(port: int, target: str, name: str = "r") -> dict[str, object]:
    return {"name": name, "listen_port": port, "target": target}


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_busy_metrics_port_fails_the_start(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        proc: StandaloneProc = standalone(
            [_rule(ports.port(), origin(echo).address)],
            settings={"metrics_listen": f"{LOOPBACK}:{taken}"},
            ready=False,
        )
        rc = proc.wait_exit(15)
    assert rc == 73, f"exited {rc}\n{proc.stderr_tail()}"
    line = next(
        ln for ln in proc.stderr_text().splitlines() if ln.startswith("error: listen_failed:")
    )
    assert (
        f"{LOOPBACK}:{taken}" in line and "metrics_listen" in line and str(proc.config_path) in line
    ), line
    assert proc.events("supervisor.ready") == []
    wait_for(lambda: _group_gone(proc.pid), 5, what="no process left")


def test_shard_that_cannot_start_halts_without_ready(
    standalone, origin, ports, notify: FakeNotify
) -> None:  # type: ignore[no-untyped-def]
    proc: StandaloneProc = standalone(
        [_rule(ports.port(), origin(echo).address)],
        ready=False,
        env={"NOTIFY_SOCKET": notify.path, **faults_env("shard_boot")},
    )
    rc = proc.wait_exit(20)
    assert rc == 70, f"exited {rc}\n{proc.stderr_tail()}"
    [halt] = proc.events("supervisor.halt")
    assert (
        halt["child"] == "shard-0"
        and halt["exit_code"] == 70
        and "could not start" in halt["reason"]
    )
    assert proc.events("shard.restarted") == []
    assert notify.count("READY") == 0, "READY=1 while the only shard never came up"


def test_shard_crash_loop_halts(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    proc: StandaloneProc = standalone([_rule(ports.port(), origin(echo).address)])
    seen: set[int] = set()
    for i in range(5):
        shard = wait_for(
            lambda: (s := proc.shards().get(0)) is not None and s.pid not in seen and s,
            10,
            what=lambda: "a new shard 0\n" + proc.stderr_tail(),
        )
        if i:
            proc.wait_log("shard.restarted", since=0)  # it was respawned, not halted
        seen.add(shard.pid)
        time.sleep(0.2)  # let it say ready: these are deaths after good starts
        os.kill(shard.pid, signal.SIGKILL)
    rc = proc.wait_exit(20)
    assert rc == 75, f"exited {rc}\n{proc.stderr_tail()}"
    [halt] = proc.events("supervisor.halt")
    assert (
        halt["child"] == "shard-0" and halt["exit_code"] == 75 and "died 5 times" in halt["reason"]
    ), halt
    assert len(proc.events("shard.restarted")) == 4


def _stats(config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STANDALONE_BIN, "stats", "--config", config, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_stats_refuses_another_instance(standalone, origin, ports, tmp_path) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    mine: StandaloneProc = standalone([_rule(ports.port(), org.address, "mine")])
    other: StandaloneProc = standalone([_rule(ports.port(), org.address, "theirs")])
    ok = _stats(str(mine.config_path))
    assert ok.returncode == 0, ok.stderr
    assert [r["rule"] for r in json.loads(ok.stdout)["rules"]] == ["mine"]
    # A config whose metrics_listen names the other instance's endpoint.
    stray = tmp_path / "stray.toml"
    stray.write_text(
        f'metrics_listen = "{other.settings["metrics_listen"]}"\n'
        f'[[rule]]\nname = "mine"\nlisten_port = {ports.port()}\ntarget = "{org.address}"\n'
    )
    res = _stats(str(stray))
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert res.stdout == "" and "theirs" not in res.stderr
    assert "wrong_instance" in res.stderr and str(other.config_path) in res.stderr, res.stderr
