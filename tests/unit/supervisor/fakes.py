"""Fake children for the supervisor's unit tests, and a clock the test moves.

A fake child is a tiny entry point that the real supervisor forks, reaps,
respawns or halts (supervisor/arbiter.py, lifecycle.py, children.py): it exits
with a given code, never says it is up, says so and dies, or (``Recorder``) acts
as a shard or a rule source and reports every frame the supervisor sends it,
with the inode of every fd, one JSON line on a pipe the test reads.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from portunus.ipc.channel_end import say_up
from portunus.ipc.framing import Channel
from portunus.ipc.messages import as_dict, from_dict
from portunus.supervisor.arbiter import HANDLED_SIGNALS, RuleSource, Supervisor
from portunus.supervisor.children import Child
from portunus.supervisor.policy import Role

Entry = Callable[[socket.socket], None]


class Clock:
    """The supervisor's clock (backoff, crash loops, heartbeats, retries): it only
    moves when the test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, secs: float) -> None:
        self.now += secs


# ------------------------------------------------------------ fates of a child


def exits(code: int) -> Entry:
    """Exits with ``code`` before it says it is up."""

    def entry(sock: socket.socket) -> None:
        raise SystemExit(code)

    return entry


def up_then_exits(code: int) -> Entry:
    """Says it is up, then exits with ``code`` at once."""

    def entry(sock: socket.socket) -> None:
        say_up(sock)
        raise SystemExit(code)

    return entry


def idles(*, up: bool) -> Entry:
    """Lives until a signal ends it (SIGTERM: the default action); says up if ``up``.
    Never sends a heartbeat."""

    def entry(sock: socket.socket) -> None:
        if up:
            say_up(sock)
        while True:
            signal.pause()

    return entry


def kills_itself() -> Entry:
    """Dies of SIGKILL before it says it is up (an OOM kill, say)."""

    def entry(sock: socket.socket) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    return entry


def child(role: Role, entry: Entry, index: int = 0) -> Child:
    name = f"shard-{index}" if role is Role.SHARD else str(role)
    return Child(name=name, title=f"test: {name}", entry=entry, role=role, index=index)


class PidsSeen:
    """How many processes ``child`` has been so far (call it every turn)."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.pids: set[int] = set()

    def __call__(self) -> int:
        if self.child.pid:
            self.pids.add(self.child.pid)
        return len(self.pids)


# ------------------------------------------------------------ recording children


class Reports:
    """The pipe every ``Recorder`` child writes its reports to, read by the test."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self._buf = b""
        self.lines: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            while chunk := os.read(self.r, 65536):
                self._buf += chunk
        except BlockingIOError:
            pass
        *done, self._buf = self._buf.split(b"\n")
        self.lines += [json.loads(line) for line in done]
        return self.lines

    def of(self, name: str, kind: str | None = None) -> list[dict[str, Any]]:
        """Frames ``name`` received so far (of type ``kind``), oldest first."""
        return [r for r in self.poll() if r["to"] == name and (kind is None or r["type"] == kind)]

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class Recorder:
    """A fake shard or rule source: says ``hello_type`` once, reports every frame it
    receives, answers a removal with ``drained`` when ``drains``, and forwards to
    the supervisor each JSON line the test writes with ``tell``."""

    def __init__(self, reports: Reports, name: str, *, drains: bool = True) -> None:
        self.reports = reports
        self.name = name
        self.drains = drains
        self.cmd_r, self.cmd_w = os.pipe()

    def close(self) -> None:
        os.close(self.cmd_r)
        os.close(self.cmd_w)

    def tell(self, msg: dict[str, Any]) -> None:
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\n")

    def entry(self, hello_type: str) -> Entry:
        def run(sock: socket.socket) -> None:
            self._serve(Channel(sock), hello_type)

        return run

    def _serve(self, channel: Channel, hello_type: str) -> None:
        channel.send(from_dict({"type": hello_type}))
        sel = selectors.DefaultSelector()
        sel.register(channel.sock, selectors.EVENT_READ, "channel")
        sel.register(self.cmd_r, selectors.EVENT_READ, "test")
        pending = b""
        while True:
            for key, _ in sel.select():
                if key.data == "test":
                    pending += os.read(self.cmd_r, 65536)
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        channel.send(from_dict(json.loads(line)))
                    continue
                try:
                    frames = channel.read()
                except EOFError:
                    return
                for typed, fds in frames:
                    msg = as_dict(typed)
                    self._report(msg, fds)
                    if self.drains and msg.get("type") == "rules" and msg.get("remove"):
                        channel.send(from_dict({"type": "drained", "ids": msg["remove"]}))
            while not channel.flush():
                time.sleep(0.001)

    def _report(self, msg: dict[str, Any], fds: list[int]) -> None:
        line = {"to": self.name, **msg, "inodes": [os.fstat(fd).st_ino for fd in fds]}
        for fd in fds:
            os.close(fd)
        if "upsert" in line:  # a rule on the wire is long: its id says enough
            line["upsert"] = [r["id"] for r in line["upsert"]]
        line.pop("settings", None)
        data = json.dumps(line).encode() + b"\n"
        assert len(data) <= 4096, "one atomic pipe write (PIPE_BUF)"
        os.write(self.reports.w, data)


# ------------------------------------------------------------ driving a supervisor


def make_supervisor(
    children: list[Child],
    clock: Clock,
    metrics_dir: Path,
    *,
    source_role: Role | None = None,
    source: RuleSource | None = None,
) -> Supervisor:
    return Supervisor(
        children=children,
        listen_address="127.0.0.1",
        shard_settings={},
        drain_secs=0.0,
        metrics_dir=str(metrics_dir),
        source=source,
        source_role=source_role,
        clock=clock,
    )


def drive(
    sup: Supervisor,
    until: Callable[[], bool],
    *,
    clock: Clock | None = None,
    step: float = 0.0,
    timeout: float = 10.0,
    what: str = "the condition",
) -> None:
    """Turn the supervisor's main loop (advancing ``clock`` by ``step`` a turn)
    until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        sup.tick(0.02)
        if clock is not None:
            clock.advance(step)


@contextmanager
def supervising(sup: Supervisor) -> Iterator[Supervisor]:
    """``sup`` set up in this (the test's) process, its children started; at the
    end every child is stopped and reaped, and the test process's signal
    handling is as it was."""
    saved = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    try:
        sup.setup()
        sup.start_children()
        yield sup
    finally:
        sup.stopping = True
        sup.drain_secs = 0.0
        try:
            sup.shutdown()
        finally:
            sup.selector.close()
            for fd in (sup._wake_r, sup._wake_w):
                os.close(fd)
            sup.notifier.close()
            signal.set_wakeup_fd(-1)
            for sig, handler in saved.items():
                signal.signal(sig, handler)
