"""Process management half of the supervisor: forking, reaping, respawning,
halting and signalling children (``Supervisor`` in arbiter.py mixes it in).

Which death is respawned and which halts the service is decided by one table in
policy.py; this module only carries it out.  Everything here runs in the
supervisor's single thread, from its main loop.
"""

from __future__ import annotations

import functools
import os
import selectors
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from portunus.ipc.messages import PROTOCOL_VERSION, Hello
from portunus.logs import log_event
from portunus.supervisor.children import Child, fork_child
from portunus.supervisor.listeners import ListenerTable
from portunus.supervisor.notify import Notifier
from portunus.supervisor.policy import Death, DeathLog, Role, decide

if TYPE_CHECKING:
    from prometheus_client import Counter

HEARTBEAT_TIMEOUT = 10.0


class ChildManager:
    """Children of the supervisor; state lives on the ``Supervisor`` instance."""

    services: list[Child]
    shards: list[Child]
    source_child: Child | None
    listeners: ListenerTable
    own_sockets: list[socket.socket]
    selector: selectors.BaseSelector
    notifier: Notifier
    deaths: DeathLog
    pending_drain: dict[str, set[int]]
    metrics_dir: str
    stopping: bool
    exit_code: int
    halt_reason: str | None
    clock: Callable[[], float]
    _wake_r: int
    _wake_w: int

    if TYPE_CHECKING:  # provided by the other half of Supervisor, and by arbiter.py

        def _send_everything(self, shard: Child) -> None: ...

        def _finish_drains(self) -> None: ...

        def on_channel(self, child: Child, events: int) -> None: ...

    def all_children(self) -> list[Child]:
        return [*self.services, *self.shards]

    def spawn(self, child: Child) -> None:
        fork_child(child, lambda: self._child_cleanup(child), self.clock())
        if child.channel is not None:
            self.selector.register(child.channel.sock, selectors.EVENT_READ, child)
        if child.role is Role.SHARD:
            self._send_everything(child)
        elif child is self.source_child and child.channel is not None:
            child.channel.send(Hello(version=PROTOCOL_VERSION, shards=len(self.shards)))
        log_event("child.started", child=child.name, pid=child.pid)

    def _child_cleanup(self, child: Child) -> None:
        """In a freshly forked child: drop every fd the supervisor holds, except
        the own listeners this child serves."""
        for s in self.listeners.all_sockets():
            os.close(s.detach())
        for s in self.own_sockets:
            if not any(s is mine for mine in child.sockets):
                os.close(s.detach())
        if self.listeners.store is not None:
            for socks in self.listeners.store.inherited.values():  # not claimed (yet)
                for s in socks:
                    os.close(s.detach())
        for c in self.all_children():
            if c.channel is not None:
                os.close(c.channel.sock.detach())
        self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.notifier.close()

    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self.all_children() if c.pid == pid), None)
            if child is None:
                continue  # not ours (or already forgotten)
            self._child_exited(child, status)

    def _child_exited(self, child: Child, status: int) -> None:
        code: int | None
        if os.WIFEXITED(status):
            how, code = f"exit {os.WEXITSTATUS(status)}", os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            how, code = f"signal {signal.Signals(os.WTERMSIG(status)).name}", None
        else:
            how, code = f"status {status}", None
        if child.channel is not None:
            if not self.stopping and not child.channel.closed:
                # What it said before it died still counts: an "up" read here makes
                # a quick death after a good start a respawn, not a boot failure.
                self.on_channel(child, selectors.EVENT_READ)
            try:
                self.selector.unregister(child.channel.sock)
            except (KeyError, ValueError):
                pass
            child.channel.close()
            child.channel = None
        old_pid, child.pid = child.pid, 0
        self._mark_dead(old_pid)
        if child.role is Role.SHARD:
            for waiting in self.pending_drain.values():
                waiting.discard(child.index)
            self._finish_drains()
        if self.stopping:
            log_event("child.exited", child=child.name, pid=old_pid, how=how)
            return
        now = self.clock()
        death = Death(code=code, how=how, was_up=child.up)
        verdict = decide(child.role, death, self.deaths.record(child.name, now))
        if verdict is not None:
            child.halted = True
            self.halt(
                f"{child.name} {verdict.why}", verdict.code, child=child.name, pid=old_pid, how=how
            )
            return
        delay = child.schedule_restart(now)
        if child.role is Role.SHARD:
            shard_restarts().labels(str(child.index)).inc()
        log_event(
            "shard.restarted" if child.role is Role.SHARD else "child.restarting",
            level="warning",
            child=child.name,
            pid=old_pid,
            how=how,
            restart_in_secs=round(delay, 3),
        )

    def _mark_dead(self, pid: int) -> None:
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)
        except Exception:  # noqa: BLE001 - metrics must never stop supervision
            pass

    def manage_children(self) -> None:
        if self.stopping:
            return
        now = self.clock()
        for child in self.all_children():
            if (
                not child.alive
                and not child.halted
                and child.due_at is not None
                and child.due_at <= now
            ):
                self.spawn(child)

    def check_heartbeats(self) -> None:
        now = self.clock()
        for shard in self.shards:
            if shard.alive and now - shard.last_heartbeat > HEARTBEAT_TIMEOUT:
                log_event(
                    "shard.unresponsive",
                    level="error",
                    child=shard.name,
                    pid=shard.pid,
                    silent_secs=round(now - shard.last_heartbeat, 1),
                )
                self._signal(shard, signal.SIGKILL)
                shard.last_heartbeat = now

    def halt(self, reason: str, code: int, **fields: Any) -> None:
        """Stop the whole service with ``code``; the one log line that says why
        (and, kept in ``halt_reason``, systemd's status line while it stops)."""
        log_event("supervisor.halt", level="error", reason=reason, exit_code=int(code), **fields)
        self.halt_reason = reason
        self.exit_code = int(code)
        self.stopping = True

    def _signal(self, child: Child, sig: int) -> None:
        if child.alive:
            try:
                os.kill(child.pid, sig)
            except ProcessLookupError:
                pass  # already dead; reaped next turn

    def kill_all(self, sig: int) -> None:
        for child in self.all_children():
            self._signal(child, sig)


@functools.cache
def shard_restarts() -> Counter:
    """The supervisor's own series, made on first use: after the CLI exported
    PROMETHEUS_MULTIPROC_DIR, and once per process however many supervisors run."""
    from portunus.metrics.catalog import SHARD_RESTARTS

    return SHARD_RESTARTS.counter()
