"""Forked children of the supervisor: shards and services (control, web, metrics, link).

``fork_child`` is the one place that forks.  The child resets inherited signal
handling first, drops every fd it inherited from the supervisor (listening
sockets in particular: a stray copy would keep a removed rule's port bound),
names itself, and runs its entry point, which must never return.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from portunus import logs
from portunus.errors import PortunusError
from portunus.ipc.framing import Channel
from portunus.supervisor.policy import Role

RESET_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGQUIT,
    signal.SIGUSR1,
)
BACKOFF_FIRST = 0.0  # the first restart is immediate: the accept queue is waiting
BACKOFF_MIN = 0.1
BACKOFF_MAX = 10.0
STABLE_SECS = 30.0


@dataclass
class Child:
    """A supervised process; ``name`` is its process label (``shard-0``, ``control``).

    Which children a service runs, and what each runs, is declared by the
    command's process tree (portunus/process_trees.py): the supervisor is handed
    ``entry`` and never imports a child's code itself.
    """

    name: str
    title: str
    entry: Callable[[socket.socket], None]  # runs in the child, handed its channel end
    role: Role
    index: int = 0  # which shard (role SHARD): its listener copies and its metrics label
    pid: int = 0
    channel: Channel | None = None
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    synced: bool = False  # the rule source child: sent its first full rule set
    failures_in_row: int = 0
    due_at: float | None = None  # when a dead child may be spawned again
    halted: bool = False
    up: bool = False  # said "up" (shards: "ready") since its last start
    # Own listeners (supervisor/own_listeners.py) this child serves; every other
    # child closes its inherited copies.
    sockets: list[socket.socket] = field(default_factory=list)
    # Reads its channel and wants reloaded settings (a ``settings`` frame per SIGHUP).
    # A child that never reads (metrics) must not be sent them: unread frames would
    # fill its socket buffer, then the supervisor's own write buffer, reload by reload.
    takes_settings: bool = True

    @property
    def alive(self) -> bool:
        return self.pid > 0

    def schedule_restart(self, now: float) -> float:
        if now - self.started_at > STABLE_SECS:
            self.failures_in_row = 0
        if self.failures_in_row == 0:
            delay = BACKOFF_FIRST
        else:
            delay = min(
                BACKOFF_MAX, BACKOFF_MIN * 2.0 ** min(self.failures_in_row - 1, 60)
            )  # no overflow
            delay *= random.uniform(0.8, 1.2)  # jitter: restarts of many children do not align
        self.failures_in_row += 1
        self.due_at = now + delay
        return delay


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, however it dies.

    Without it a SIGKILLed supervisor leaves its services as orphans that keep
    their ports (metrics_listen, the API) bound, and the next start fails to bind.
    Shards get SIGTERM too and drain as on a normal stop.  If the supervisor
    died between fork() and here, the signal will never come: exit at once.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux / no libc symbol: the channel EOF still ends shards
    if os.getppid() != parent_pid:
        raise SystemExit(0)


def fork_child(child: Child, cleanup: Callable[[], None], now: float) -> None:
    """Fork ``child``; in the parent record pid and channel (started ``now`` on the
    supervisor's clock), in the child run it.

    Every child gets a channel: it is how a child says it is up, and a child that
    never can would halt the service at its first exit (policy.py)."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (parent_sock, child_sock):
        s.set_inheritable(False)
    parent_pid = os.getpid()
    # Until the child has reset them, the supervisor's handlers would only enqueue a
    # signal in the child's copy of the queue: a SIGTERM sent right after the fork
    # would be lost, and the stop would wait for the SIGKILL.  Held back instead,
    # it is delivered to the child's default handler.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, RESET_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    if pid == 0:  # ---------------------------------------------------- child
        code = 1
        try:
            for sig in RESET_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            # A reload is the supervisor's business: it tells children over their
            # channel.  A stray SIGHUP (to the whole group) must not kill one; children
            # that want it (the edge link: reconnect now) install their own handler.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            _die_with_parent(parent_pid)
            os.close(parent_sock.detach())
            cleanup()
            try:
                import setproctitle

                setproctitle.setproctitle(child.title)
            except ImportError:
                pass
            logs.configure(process=child.name)
            child.entry(child_sock)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except PortunusError as exc:
            # A refusal with a contract exit code (78: schema newer than this code)
            # must reach the supervisor as that code, so it halts instead of respawning.
            logs.log_event(
                "child.refused",
                level="error",
                child=child.name,
                code=exc.code,
                message=exc.message,
                exit_code=exc.exit_code,
            )
            code = exc.exit_code
        except BaseException as exc:  # noqa: BLE001 - report, never return into the parent's code
            logs.log_event("child.crashed", level="error", child=child.name, error=repr(exc))
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    # ------------------------------------------------------------------ parent
    signal.pthread_sigmask(signal.SIG_SETMASK, held)
    child_sock.close()
    child.pid = pid
    child.channel = Channel(parent_sock)
    child.started_at = child.last_heartbeat = now
    child.synced = False
    child.up = False
    child.due_at = None
