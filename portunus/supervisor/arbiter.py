"""The supervisor: a small, synchronous, signal-driven process manager.

Runs in the service's main process, with no event loop and no threads (forking
from either deadlocks children).  Signal handlers only enqueue the signal and
wake the selector; the main loop takes queued signals, reads child channels,
reaps with ``waitpid(-1, WNOHANG)``, checks shard heartbeats and respawns what
died, with backoff.  It owns every listening socket (see listeners.py) and the
rule table (rulebook.py), and takes its rules from a pluggable source: a TOML
file read here, or a child process (control, or an edge link) that sends
``apply``/``sync`` messages over its channel.

The module is longer than most here on purpose: like gunicorn's arbiter it is one
state machine (signals, children, channels, rules, shutdown) whose transitions are
easier to check when they read top to bottom in one class; the pieces that stand
alone already live beside it (children.py, listeners.py, rulebook.py, framing.py).
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import socket
import time
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

from portunus.exitcodes import ServiceExit
from portunus.logs import log_event
from portunus.rules import Rule
from portunus.supervisor.children import Child, fork_child
from portunus.supervisor.framing import MAX_FDS_PER_FRAME, ProtocolError
from portunus.supervisor.listeners import ListenerTable
from portunus.supervisor.notify import Notifier
from portunus.supervisor.policy import Death, DeathLog, Role, decide
from portunus.supervisor.rulebook import Delta, RuleBook

HEARTBEAT_TIMEOUT = 10.0
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT)


class RuleSource:
    """Where rules come from.  ``load`` runs at start and on SIGHUP."""

    name = "none"

    def load(self) -> list[Rule] | None:
        """Return the full desired rule set, or None to leave rules alone."""
        return None


class Supervisor:
    def __init__(
        self,
        *,
        shards: int,
        listen_address: str,
        shard_settings: dict[str, Any],
        drain_secs: float,
        metrics_dir: str,
        source: RuleSource | None = None,
        services: list[Child] | None = None,
        rule_child: str | None = None,
        ready_checks: list[Callable[[], bool]] | None = None,
        own_sockets: list[socket.socket] | None = None,
        reloader: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self.shard_settings = shard_settings
        self.drain_secs = drain_secs
        self.metrics_dir = metrics_dir
        self.source = source or RuleSource()
        self.listeners = ListenerTable(listen_address, shards)
        self.book = RuleBook(self.listeners)
        self.shards = [
            Child(name=f"shard-{i}", title=f"portunus: shard {i}", entry=self._shard_entry(i),
                  wants_channel=True, index=i, role=Role.SHARD)
            for i in range(shards)
        ]
        self.services = services or []
        self.rule_child = rule_child  # name of the service whose channel is the rule source
        self.ready_checks = list(ready_checks or [])
        self.own_sockets = list(own_sockets or [])  # API, metrics, gateway: bound before forking
        self.deaths = DeathLog()
        self.reloader = reloader  # SIGHUP: re-read settings; returns the reloadable changes or None
        self.pending_drain: dict[str, set[int]] = {}
        self.signals: SimpleQueue[int] = SimpleQueue()
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.stopping = False
        self.exit_code = 0
        self.announced_ready = False
        self.halt_reason: str | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._last_watchdog = 0.0
        self._restarts: Any = None

    # ================================================================ run

    def run(self) -> int:
        """Run until stopped; returns the process exit code.  Called once, in the
        service's main process."""
        try:
            self.setup()
            self.start_children()
            self.load_source()
            while not self.stopping:
                # Until READY is announced, poll the ready checks often.
                self.tick(1.0 if self.announced_ready else 0.05)
            self.shutdown()
        except Exception as exc:
            log_event("supervisor.crashed", level="error", error=repr(exc))
            self.kill_all(signal.SIGKILL)
            return ServiceExit.ERROR
        finally:
            self.notifier.close()
        return self.exit_code

    def setup(self) -> None:
        _raise_nofile_limit()
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._enqueue_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        from prometheus_client import Counter

        from portunus.shard.metrics import BYTES_IN  # noqa: F401 - import once, before forking

        self._restarts = Counter(
            "portunus_shard_restarts_total", "Shards restarted after they died", ("shard",)
        )

    def _enqueue_signal(self, signum: int, frame: Any) -> None:
        # Only enqueue: no logging, no reaping in a signal handler.
        self.signals.put_nowait(signum)

    def start_children(self) -> None:
        for child in self.services:
            self.spawn(child)
        for shard in self.shards:
            self.spawn(shard)

    def load_source(self) -> None:
        rules = self.source.load()
        if rules is not None:
            self.apply_sync(rules)
        self.maybe_ready()

    def tick(self, timeout: float) -> None:
        """One turn of the main loop."""
        now = time.monotonic()
        due = [c.due_at for c in self.all_children() if c.due_at is not None and not c.alive]
        interval = self.notifier.watchdog_interval
        if interval is not None:
            # Wake for the next ping: a fixed 1 s tick would stretch the ping gap past
            # WATCHDOG_USEC/2 and, with WatchdogSec=1, past the deadline itself.
            due.append(self._last_watchdog + interval)
        if due:
            timeout = max(0.0, min(timeout, min(due) - now))
        for key, events in self.selector.select(timeout):
            if key.data is None:
                self._drain_wakeup()
            else:
                self.on_channel(key.data, events)
        self.handle_signals()
        self.reap_children()
        self.check_heartbeats()
        self.manage_children()
        self.maybe_ready()
        self.watchdog()

    # ============================================================ signals

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self) -> None:
        while True:
            try:
                signum = self.signals.get_nowait()
            except Empty:
                return
            name = signal.Signals(signum).name.lower()
            handler = getattr(self, f"handle_{name}", None)
            if handler is not None:
                handler()

    def handle_sigterm(self) -> None:
        log_event("supervisor.stopping", signal="SIGTERM", drain_secs=self.drain_secs)
        self.stopping = True

    handle_sigint = handle_sigterm

    def handle_sigquit(self) -> None:
        log_event("supervisor.stopping", signal="SIGQUIT", drain_secs=0)
        self.drain_secs = 0.0
        self.stopping = True

    def handle_sighup(self) -> None:
        """Reload: rules from an in-process source, settings from the file.  No
        child is restarted and no socket closed; an invalid file changes nothing."""
        log_event("supervisor.reload", source=self.source.name)
        self.notifier.reloading()
        try:
            rules = self.source.load()
            changed = self.reloader() if self.reloader is not None else None
        except Exception as exc:  # noqa: BLE001 - a bad reload changes nothing
            log_event("supervisor.reload_failed", level="error", error=str(exc))
            rules = changed = None
        if rules is not None:
            self.apply_sync(rules)
        if changed:
            self.push_settings(changed)
        for child in self.services:
            if child.alive and child.role is Role.LINK:
                self._signal(child, signal.SIGHUP)  # the edge link: reconnect now
        self.notifier.ready(self.status_line())

    def push_settings(self, changed: dict[str, Any]) -> None:
        """Hand reloaded settings to every live child, and to respawns to come."""
        if "shutdown_drain_timeout_secs" in changed:
            self.drain_secs = float(changed["shutdown_drain_timeout_secs"])
        for key, value in changed.items():
            if key in self.shard_settings:
                self.shard_settings[key] = value
        for shard in self.shards:
            self.send(shard, {"type": "config", "shard": shard.index, "settings": self.shard_settings})
        for child in self.services:
            self.send(child, {"type": "settings", "settings": changed})

    def handle_sigchld(self) -> None:
        pass  # reap_children runs every turn

    # ============================================================ children

    def all_children(self) -> list[Child]:
        return [*self.services, *self.shards]

    def spawn(self, child: Child) -> None:
        fork_child(child, lambda keep: self._child_cleanup(child, keep))
        if child.channel is not None:
            self.selector.register(child.channel.sock, selectors.EVENT_READ, child)
        if child.index >= 0:
            self._send_everything(child)
        elif child.name == self.rule_child and child.channel is not None:
            child.channel.send({"type": "hello", "version": 1, "shards": len(self.shards)})
        log_event("child.started", child=child.name, pid=child.pid)

    def _child_cleanup(self, child: Child, keep: socket.socket | None) -> None:
        """In a freshly forked child: drop every fd the supervisor holds, except
        the own listeners this child serves."""
        for s in self.listeners.all_sockets():
            os.close(s.detach())
        for s in self.own_sockets:
            if not any(s is mine for mine in child.sockets):
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
            self.halt(f"{child.name} {verdict.why}", verdict.code, child=child.name, pid=old_pid, how=how)
            return
        delay = child.schedule_restart(now)
        child.restarts += 1
        if child.index >= 0 and self._restarts is not None:
            self._restarts.labels(str(child.index)).inc()
        log_event("shard.restarted" if child.index >= 0 else "child.restarting", level="warning",
                  child=child.name, pid=old_pid, how=how, restart_in_secs=round(delay, 3))

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
            if not child.alive and not child.halted and child.due_at is not None and child.due_at <= now:
                self.spawn(child)

    def check_heartbeats(self) -> None:
        now = time.monotonic()
        for shard in self.shards:
            if shard.alive and now - shard.last_heartbeat > HEARTBEAT_TIMEOUT:
                log_event("shard.unresponsive", level="error", child=shard.name, pid=shard.pid,
                          silent_secs=round(now - shard.last_heartbeat, 1))
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

    # ============================================================ channels

    def on_channel(self, child: Child, events: int) -> None:
        channel = child.channel
        if channel is None:
            return
        if events & selectors.EVENT_WRITE and channel.flush():
            self.selector.modify(channel.sock, selectors.EVENT_READ, child)
        if not events & selectors.EVENT_READ:
            return
        try:
            frames = channel.read()
        except (EOFError, ProtocolError, OSError):
            # The child is dying; reap_children will notice and clean up.
            self.selector.unregister(channel.sock)
            return
        for msg, fds in frames:
            for fd in fds:
                os.close(fd)  # children never send us fds
            if msg.get("type") == "up":
                child.up = True
            elif child.index >= 0:
                self.on_shard_message(child, msg)
            elif child.name == self.rule_child:
                self.on_source_message(child, msg)

    def send(self, child: Child, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        channel = child.channel
        if channel is None or channel.closed:
            return
        channel.send(msg, fds or [])
        if channel.wants_write:
            self.selector.modify(channel.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, child)

    def on_shard_message(self, shard: Child, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        shard.last_heartbeat = time.monotonic()
        if kind == "ready":
            shard.ready = shard.up = True
        elif kind == "drained":
            for rid in msg.get("ids", []):
                waiting = self.pending_drain.get(str(rid))
                if waiting is not None:
                    waiting.discard(shard.index)
            self._finish_drains()

    def on_source_message(self, child: Child, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        unknown: list[str] = []
        if kind == "apply":
            upsert = [Rule.from_wire(w) for w in msg.get("upsert", [])]
            remove = [str(r) for r in msg.get("remove", [])]
            # Nothing to drain for a rule we never bound (e.g. one that failed): say so now.
            unknown = [rid for rid in remove if rid not in self.book.rules]
            results, delta = self.book.apply(upsert, remove)
        elif kind == "sync":
            results, delta = self.book.sync([Rule.from_wire(w) for w in msg.get("rules", [])])
            child.ready = True
        else:
            return
        self.broadcast(delta)
        self.send(child, {"type": "applied", "seq": msg.get("seq"), "results": results})
        if unknown:
            self.send(child, {"type": "removed", "ids": unknown})
        self.notifier.status(self.status_line())

    # ============================================================== rules

    def apply_sync(self, rules: list[Rule]) -> None:
        _results, delta = self.book.sync(rules)
        self.broadcast(delta)
        self.notifier.status(self.status_line())

    def broadcast(self, delta: Delta) -> None:
        """Tell every live shard about a change, in the order that keeps it consistent."""
        if not delta:
            return
        for rid in delta.remove:
            self.pending_drain[rid] = {s.index for s in self.shards if s.alive}
        for shard in self.shards:
            if not shard.alive:
                continue  # it gets everything when it is respawned
            self._send_listeners(shard, delta.new_keys)
            self.send(shard, {
                "type": "rules",
                "upsert": [r.to_wire() for r in delta.upsert],
                "remove": delta.remove,
            })
            if delta.gone_keys:
                self.send(shard, {"type": "listeners", "remove": delta.gone_keys})
        self._finish_drains()

    def _send_listeners(self, shard: Child, keys: list[str] | None) -> None:
        pairs = self.listeners.fds_for_shard(shard.index, keys)
        for i in range(0, len(pairs), MAX_FDS_PER_FRAME):
            batch = pairs[i : i + MAX_FDS_PER_FRAME]
            self.send(shard, {"type": "listeners", "add": [k for k, _ in batch]}, [fd for _, fd in batch])

    def _send_everything(self, shard: Child) -> None:
        self.send(shard, {"type": "config", "shard": shard.index, "settings": self.shard_settings})
        self._send_listeners(shard, None)
        self.send(shard, {"type": "rules", "upsert": [r.to_wire() for r in self.book.rules.values()],
                          "remove": []})

    def _finish_drains(self) -> None:
        done = [rid for rid, waiting in self.pending_drain.items() if not waiting]
        if not done:
            return
        for rid in done:
            del self.pending_drain[rid]
        source = next((c for c in self.services if c.name == self.rule_child), None)
        if source is not None:
            self.send(source, {"type": "removed", "ids": done})

    # ============================================================ status

    def status_line(self) -> str:
        failed = len(self.book.failed)
        text = f"forwarding {len(self.book.rules)} rule(s) on {len(self.shards)} shard(s)"
        return text + (f"; {failed} failed" if failed else "")

    def maybe_ready(self) -> None:
        """READY=1 once, when every child is up, the rule source has synced and the
        ready checks (the API answers) pass."""
        if self.announced_ready or self.stopping:
            return
        if not all(c.up for c in self.all_children()):
            return
        if self.rule_child is not None:
            source = next((c for c in self.services if c.name == self.rule_child), None)
            if source is None or not source.ready:
                return
        if not all(check() for check in self.ready_checks):
            return
        self.announced_ready = True
        self.notifier.ready(self.status_line())
        log_event("supervisor.ready", rules=len(self.book.rules), failed=len(self.book.failed),
                  shards=len(self.shards), pid=os.getpid())

    def watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()

    # ============================================================ shutdown

    def shutdown(self) -> None:
        """SIGTERM path: stop accepting, let shards drain, then stop services."""
        self.notifier.stopping()
        # Our copies first: once every copy of a listener is closed the kernel
        # refuses new connections instead of queueing them for nobody.
        self.listeners.close_all()
        for shard in self.shards:
            self._signal(shard, signal.SIGTERM)
        deadline = time.monotonic() + self.drain_secs + 5.0
        self._wait_for(self.shards, deadline)
        for child in self.services:
            self._signal(child, signal.SIGTERM)
        self._wait_for(self.services, time.monotonic() + 10.0)
        for s in self.own_sockets:
            s.close()
        log_event("supervisor.stopped", exit_code=self.exit_code)

    def _wait_for(self, children: list[Child], deadline: float) -> None:
        while any(c.alive for c in children):
            if time.monotonic() > deadline:
                for c in children:
                    if c.alive:
                        log_event("child.killed", level="warning", child=c.name, pid=c.pid)
                        self._signal(c, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
            for key, _events in self.selector.select(0.1):
                if key.data is None:
                    self._drain_wakeup()
                elif key.data.channel is not None:
                    try:
                        key.data.channel.read()
                    except (EOFError, ProtocolError, OSError):
                        try:
                            self.selector.unregister(key.fileobj)
                        except (KeyError, ValueError):
                            pass
            self.reap_children()


def _raise_nofile_limit() -> None:
    """Each connection costs fds (two sockets, pipes): take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
