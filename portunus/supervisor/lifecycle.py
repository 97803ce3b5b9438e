"""Process management half of the supervisor: forking, reaping, respawning,
halting and signalling children (``Supervisor`` in arbiter.py mixes it in).

Which death is respawned and which halts the service is decided by one table in
policy.py; this module only carries it out.  Everything here runs in the
supervisor's single thread, from its main loop.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from portunus.ipc.messages import PROTOCOL_VERSION, Hello
from portunus.logs import log_event
from portunus.supervisor.children import Child, fork_child
from portunus.supervisor.listeners import ListenerTable
from portunus.supervisor.notify import Notifier
from portunus.supervisor.policy import Death, DeathLog, decide

HEARTBEAT_TIMEOUT = 10.0


class ChildManager:
    """Children of the supervisor; state lives on the ``Supervisor`` instance."""

    services: list[Child]
    shards: list[Child]
    listeners: ListenerTable
    own_sockets: list[socket.socket]
    selector: selectors.BaseSelector
    notifier: Notifier
    deaths: DeathLog
    pending_drain: dict[str, set[int]]
    rule_child: str | None
    metrics_dir: str
    stopping: bool
    exit_code: int
    halt_reason: str | None
    _restarts: Any
    _wake_r: int
    _wake_w: int

    if TYPE_CHECKING:  # provided by the other half of Supervisor

        def _send_everything(self, shard: Child) -> None: ...

        def _finish_drains(self) -> None: ...

    def all_children(self) -> list[Child]:
        return [*self.services, *self.shards]

    def spawn(self, child: Child) -> None:
        fork_child(child, lambda keep: self._child_cleanup(child, keep))
        if child.channel is not None:
            self.selector.register(child.channel.sock, selectors.EVENT_READ, child)
        if child.index >= 0:
            self._send_everything(child)
        elif child.name == self.rule_child and child.channel is not None:
            child.channel.send(Hello(version=PROTOCOL_VERSION, shards=len(self.shards)))
        log_event("child.started", child=child.name, pid=child.pid)

    def _child_cleanup(self, child: Child, keep: socket.socket | None) -> None:
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

    def _shard_entry(self, index: int) -> Callable[[socket.socket | None], None]:
        def entry(sock: socket.socket | None) -> None:
            from portunus.shard.main import run_shard

            assert sock is not None
            run_shard(index, sock)

        return entry

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
            try:
                self.selector.unregister(child.channel.sock)
            except (KeyError, ValueError):
                pass
            child.channel.close()
            child.channel = None
        old_pid, child.pid = child.pid, 0
        self._mark_dead(old_pid)
        if child.index >= 0:
            for waiting in self.pending_drain.values():
                waiting.discard(child.index)
            self._finish_drains()
        if self.stopping:
            log_event("child.exited", child=child.name, pid=old_pid, how=how)
            return
        now = time.monotonic()
        death = Death(code=code, how=how, was_up=child.up)
        verdict = decide(child.role, death, self.deaths.record(child.name, now))
        if verdict is not None:
            child.halted = True
            self.halt(
                f"{child.name} {verdict.why}", verdict.code, child=child.name, pid=old_pid, how=how
            )
            return
        delay = child.schedule_restart(now)
        child.restarts += 1
        if child.index >= 0 and self._restarts is not None:
            self._restarts.labels(str(child.index)).inc()
        log_event(
            "shard.restarted" if child.index >= 0 else "child.restarting",
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
        now = time.monotonic()
        for child in self.all_children():
            if (
                not child.alive
                and not child.halted
                and child.due_at is not None
                and child.due_at <= now
            ):
                self.spawn(child)

    def check_heartbeats(self) -> None:
        now = time.monotonic()
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
        """Stop the whole service with ``code``; the one log line that says why."""
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
