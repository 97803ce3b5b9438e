"""Process management half of the supervisor (lifecycle.py, children.py, policy.py)
driven through its real fork/reap/respawn code path with fake children: which
death is respawned, when, and which halts the service with which exit code."""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from portunus.exitcodes import ChildExit, ServiceExit
from portunus.supervisor.arbiter import HANDLED_SIGNALS, Supervisor
from portunus.supervisor.children import Child
from portunus.supervisor.lifecycle import HEARTBEAT_TIMEOUT, shard_restarts
from portunus.supervisor.policy import CRASH_LOOP_DEATHS, CRASH_LOOP_WINDOW_SECS, TABLE, Role

from .fakes import (
    Clock,
    Entry,
    PidsSeen,
    child,
    drive,
    exits,
    idles,
    kills_itself,
    make_supervisor,
    supervising,
    up_then_exits,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def run_to_end(sup: Supervisor) -> int:
    """``Supervisor.run`` in the test's process, which gets its signal handling back."""
    saved = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    try:
        return sup.run()
    finally:
        sup.selector.close()
        for fd in (sup._wake_r, sup._wake_w):
            os.close(fd)
        signal.set_wakeup_fd(-1)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def tree(shard: Entry, service: Entry | None = None, role: Role = Role.METRICS) -> list[Child]:
    """One shard and one service of ``role`` beside it (by default one that stays up)."""
    return [child(Role.SHARD, shard), child(role, service or idles(up=True))]


# ------------------------------------------------------------ halting


@pytest.mark.parametrize("role", [Role.SHARD, Role.METRICS])
def test_a_child_that_exits_before_it_is_up_halts_with_70(
    role: Role, clock: Clock, tmp_path: Path
) -> None:
    fatal = exits(1)
    kids = tree(fatal) if role is Role.SHARD else tree(idles(up=True), fatal, role)
    sup = make_supervisor(kids, clock, tmp_path)
    assert run_to_end(sup) == ServiceExit.BOOT_FAILED == 70
    name = "shard-0" if role is Role.SHARD else str(role)
    assert sup.halt_reason == f"{name} could not start (exit 1); its own log line above says why"
    assert not sup.announced_ready
    assert not any(c.alive for c in sup.all_children()), "the halt stopped every child"


@pytest.mark.parametrize(
    ("role", "code", "expected"),
    [
        (Role.SHARD, ChildExit.CONFIG, ServiceExit.CONFIG),
        (Role.WEB, ChildExit.LISTEN_FAILED, ServiceExit.LISTEN_FAILED),
        (Role.LINK, ChildExit.REVOKED, ServiceExit.REVOKED),
    ],
)
def test_the_exit_code_table_halts_even_after_a_good_start(
    role: Role, code: int, expected: ServiceExit, clock: Clock, tmp_path: Path
) -> None:
    dies = up_then_exits(code)
    kids = tree(dies) if role is Role.SHARD else tree(idles(up=True), dies, role)
    sup = make_supervisor(kids, clock, tmp_path)
    assert run_to_end(sup) == expected
    name = "shard-0" if role is Role.SHARD else str(role)
    why = (TABLE.get((role, code)) or TABLE[(None, code)]).why
    assert sup.halt_reason == f"{name} {why}"


def test_a_code_in_the_table_for_another_role_is_respawned(clock: Clock, tmp_path: Path) -> None:
    """77 halts only for the edge link (revoked); a shard exiting 77 is respawned."""
    sup = make_supervisor(tree(up_then_exits(ChildExit.REVOKED)), clock, tmp_path)
    with supervising(sup):
        shard = sup.shards[0]
        first = shard.pid
        drive(sup, lambda: shard.alive and shard.pid != first, what="a respawned shard")
        assert not sup.stopping


def test_the_halt_reason_reaches_systemd_as_the_status(
    clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"portunus-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        sup = make_supervisor(tree(exits(3)), clock, tmp_path)
        assert run_to_end(sup) == ServiceExit.BOOT_FAILED
        said = []
        while True:
            try:
                said.append(listener.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        listener.close()
    assert (
        "STOPPING=1\nSTATUS=halted (exit 70): shard-0 could not start (exit 3); "
        "its own log line above says why"
    ) in said
    assert not any("READY=1" in s for s in said)


def test_sigterm_stops_every_child_and_exits_0(clock: Clock, tmp_path: Path) -> None:
    sup = make_supervisor(tree(idles(up=True)), clock, tmp_path)
    sup.signals.put_nowait(signal.SIGTERM)  # as the handler would
    assert run_to_end(sup) == ServiceExit.OK
    assert sup.halt_reason is None
    assert not any(c.alive for c in sup.all_children())


# ------------------------------------------------------------ respawning


def test_up_then_dead_at_once_is_respawned_not_a_boot_failure(clock: Clock, tmp_path: Path) -> None:
    """It said up and exited in the same instant: its death is read with its "up"."""
    sup = make_supervisor(tree(up_then_exits(1)), clock, tmp_path)
    with supervising(sup):
        seen = PidsSeen(sup.shards[0])
        drive(
            sup,
            lambda: seen() >= 3 or sup.stopping,
            clock=clock,
            step=1.0,
            what="two respawns",
        )
        assert sup.exit_code == 0 and not sup.stopping


def test_a_child_killed_before_it_is_up_is_respawned(clock: Clock, tmp_path: Path) -> None:
    """Killed by a signal is not "could not start": policy.py, rule 2."""
    sup = make_supervisor(tree(idles(up=True), kills_itself()), clock, tmp_path)
    with supervising(sup):
        seen = PidsSeen(sup.services[0])
        drive(
            sup,
            lambda: seen() >= 2 or sup.stopping,
            clock=clock,
            step=1.0,
            what="a respawn",
        )
        assert not sup.stopping


def test_first_respawn_is_immediate_the_next_waits_for_the_backoff(
    clock: Clock, tmp_path: Path
) -> None:
    sup = make_supervisor(tree(idles(up=True)), clock, tmp_path)
    with supervising(sup):
        shard = sup.shards[0]
        drive(sup, lambda: shard.up, what="the shard up")
        first = shard.pid
        os.kill(first, signal.SIGKILL)
        # The clock stands still: only an immediate respawn can happen.
        drive(sup, lambda: shard.alive and shard.pid != first, what="an immediate respawn")
        second = shard.pid
        drive(sup, lambda: shard.up, what="the respawned shard up")
        os.kill(second, signal.SIGKILL)
        drive(sup, lambda: not shard.alive, what="the second death reaped")
        for _ in range(20):
            sup.tick(0.01)
        assert not shard.alive and shard.due_at is not None and shard.due_at > clock()
        clock.advance(shard.due_at - clock())
        drive(sup, lambda: shard.alive, what="the respawn once the backoff is over")
        assert not sup.stopping


def test_a_silent_shard_is_killed_after_the_heartbeat_timeout_and_respawned(
    clock: Clock, tmp_path: Path
) -> None:
    sup = make_supervisor(tree(idles(up=True)), clock, tmp_path)
    restarts = shard_restarts().labels("0")
    before = restarts._value.get()
    with supervising(sup):
        shard = sup.shards[0]
        drive(sup, lambda: shard.up, what="the shard up")
        first = shard.pid
        clock.advance(HEARTBEAT_TIMEOUT - 1)
        for _ in range(5):
            sup.tick(0.01)
        assert shard.pid == first, "not silent for long enough yet"
        clock.advance(2)
        drive(sup, lambda: shard.alive and shard.pid != first, what="the silent shard replaced")
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # killed and reaped
        assert not sup.stopping
    assert restarts._value.get() == before + 1


# ------------------------------------------------------------ crash loops


@pytest.fixture
def flapping(clock: Clock, tmp_path: Path) -> Iterator[Supervisor]:
    """A service that comes up and dies at once, every time."""
    sup = make_supervisor(tree(idles(up=True), up_then_exits(1)), clock, tmp_path)
    with supervising(sup):
        yield sup


def test_five_deaths_within_60_s_halt_with_75(flapping: Supervisor, clock: Clock) -> None:
    drive(flapping, lambda: flapping.stopping, clock=clock, step=1.0, what="the halt")
    assert flapping.exit_code == ServiceExit.CRASH_LOOP == 75
    assert flapping.halt_reason is not None
    assert flapping.halt_reason.startswith(
        f"metrics died {CRASH_LOOP_DEATHS} times within {CRASH_LOOP_WINDOW_SECS:.0f} s (exit 1"
    )


def test_deaths_further_apart_than_the_window_are_respawned_for_ever(
    flapping: Supervisor, clock: Clock
) -> None:
    seen = PidsSeen(flapping.services[0])
    step = CRASH_LOOP_WINDOW_SECS / (CRASH_LOOP_DEATHS - 2)  # at most 4 deaths in a window
    drive(
        flapping,
        lambda: seen() > 2 * CRASH_LOOP_DEATHS or flapping.stopping,
        clock=clock,
        step=step,
        timeout=20,
        what=f"{2 * CRASH_LOOP_DEATHS} respawns",
    )
    assert not flapping.stopping and flapping.exit_code == 0


def test_children_stopped_right_after_the_fork_stop_at_once(
    clock: Clock, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A SIGTERM that arrives before a child reset the supervisor's signal handlers
    is held for it, not swallowed by a copy of the supervisor's queue (which left
    the stop waiting for the SIGKILL, 5 s later)."""
    for _ in range(3):
        kids = [child(Role.SHARD, idles(up=False))]
        with supervising(make_supervisor(kids, clock, tmp_path)) as sup:
            assert sup.shards[0].alive
        assert not sup.shards[0].alive
    assert '"child.killed"' not in capfd.readouterr().err
