"""The supervisor: a small, synchronous, signal-driven process manager.

Runs in the service's main process, with no event loop and no threads (forking
from either deadlocks children).  Signal handlers only enqueue the signal and
wake the selector; the main loop takes queued signals, reads child channels,
reaps with ``waitpid(-1, WNOHANG)``, checks shard heartbeats and respawns what
died, with backoff.  It owns every listening socket (see listeners.py) and the
rule table (rulebook.py), and takes its rules from a pluggable source: a TOML
file read here, or a child process (control, or an edge link) that sends
``apply``/``sync`` messages over its channel.

This module holds the main loop, signals, channels, readiness and shutdown; the
class mixes in the two halves that stand on their own: process management
(lifecycle.py: spawn, reap, respawn or halt after policy.py) and rule routing
(routing.py: rules to shards, answers to the source, retries, reloaded settings).
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
from portunus.supervisor.children import Child
from portunus.supervisor.fdstore import FdStore
from portunus.supervisor.framing import ProtocolError
from portunus.supervisor.lifecycle import HEARTBEAT_TIMEOUT, ChildManager
from portunus.supervisor.listeners import ListenerTable
from portunus.supervisor.notify import Notifier
from portunus.supervisor.policy import DeathLog, Role
from portunus.supervisor.retry import RetrySchedule
from portunus.supervisor.routing import RuleRouter
from portunus.supervisor.rulebook import RuleBook

__all__ = ["HEARTBEAT_TIMEOUT", "RuleSource", "Supervisor"]
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT)


class RuleSource:
    """Where rules come from.  ``load`` runs at start and on SIGHUP."""

    name = "none"

    def load(self) -> list[Rule] | None:
        """Return the full desired rule set, or None to leave rules alone."""
        return None


class Supervisor(ChildManager, RuleRouter):
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
        fdstore: FdStore | None = None,
    ) -> None:
        self.shard_settings = shard_settings
        self.drain_secs = drain_secs
        self.metrics_dir = metrics_dir
        self.source = source or RuleSource()
        self.listeners = ListenerTable(listen_address, shards, fdstore)
        self.book = RuleBook(self.listeners)
        self.shards = [
            Child(
                name=f"shard-{i}",
                title=f"portunus: shard {i}",
                entry=self._shard_entry(i),
                wants_channel=True,
                index=i,
                role=Role.SHARD,
            )
            for i in range(shards)
        ]
        self.services = services or []
        self.rule_child = rule_child  # name of the service whose channel is the rule source
        self.ready_checks = list(ready_checks or [])
        self.own_sockets = list(own_sockets or [])  # API, metrics, gateway: bound before forking
        self.deaths = DeathLog()
        self.retries = RetrySchedule()  # failed rules: try binding again with backoff
        self.reloader = reloader  # SIGHUP: re-read settings; returns the reloadable changes or None
        self.pending_drain: dict[str, set[int]] = {}
        self.owner_caps: dict[str, Any] = {}  # {owner: rate_limit}: the node's owner caps
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
        from portunus.metrics.catalog import SHARD_RESTARTS
        from portunus.shard.metrics import BYTES_IN  # noqa: F401 - import once, before forking

        self._restarts = SHARD_RESTARTS.counter()

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
        retry_at = self.retries.next_at()
        if retry_at is not None:
            due.append(retry_at)
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
        self.retry_failed()
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

    def handle_sigchld(self) -> None:
        pass  # reap_children runs every turn

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
        if self.listeners.store is not None:
            self.listeners.store.drop_unclaimed()  # kept for rules removed while we were down
        self.notifier.ready(self.status_line())
        log_event(
            "supervisor.ready",
            rules=len(self.book.rules),
            failed=len(self.book.failed),
            shards=len(self.shards),
            pid=os.getpid(),
        )

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
