"""When a child dies: respawn it, or halt the whole service (and with which code).

One policy for every kind of child, after gunicorn's WORKER_BOOT_ERROR:

1. Some exit codes mean "restarting cannot help" whatever the moment: a schema
   newer than this code, a listener that cannot be bound, a revoked client.
   They are looked up in ``TABLE``, keyed by (role, child exit code); a ``None``
   role matches every role.
2. A child that exits before it said it is up could not start: that is fatal
   (``BOOT_FAILED``), at start-up and for a respawned child alike.  A child
   *killed* by a signal before it was up is not a boot error (it was killed).
3. A child that dies ``CRASH_LOOP_DEATHS`` times within ``CRASH_LOOP_WINDOW_SECS``
   (after good starts, or killed by signals) halts the service with ``CRASH_LOOP``.
4. Anything else is respawned, with backoff (children.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from portunus.exitcodes import ChildExit, ServiceExit

CRASH_LOOP_DEATHS = 5
CRASH_LOOP_WINDOW_SECS = 60.0


class Role(StrEnum):
    SHARD = "shard"
    CONTROL = "control"
    WEB = "web"
    METRICS = "metrics"
    LINK = "link"


@dataclass(frozen=True)
class Halt:
    """Stop the service with ``code``; ``why`` completes the one log line."""

    code: ServiceExit
    why: str


REVOKED_HINT = (
    "stopped: the server revoked this client, so its token no longer works; re-enroll: "
    "`portunus-server enroll-client NAME` on the server, then `portunus-client "
    "enroll '<uri>' --out BUNDLE --force` here"
)

TABLE: dict[tuple[Role | None, int], Halt] = {
    (None, ChildExit.CONFIG): Halt(
        ServiceExit.CONFIG, "stopped: configuration or database schema problem (exit 78)"
    ),
    (None, ChildExit.LISTEN_FAILED): Halt(
        ServiceExit.LISTEN_FAILED, "stopped: a listening address could not be bound"
    ),
    (Role.LINK, ChildExit.REVOKED): Halt(ServiceExit.REVOKED, REVOKED_HINT),
}


@dataclass
class Death:
    """How a child ended: ``code`` is its exit status, None when a signal killed it."""

    code: int | None
    how: str  # "exit 3", "signal SIGKILL"
    was_up: bool


def decide(role: Role, death: Death, recent_deaths: int) -> Halt | None:
    """The policy above; ``recent_deaths`` counts this death too (within the
    window).  Returns None for "respawn"."""
    if death.code is not None:
        halt = TABLE.get((role, death.code)) or TABLE.get((None, death.code))
        if halt is not None:
            return halt
        if not death.was_up:
            return Halt(
                ServiceExit.BOOT_FAILED,
                f"could not start ({death.how}); its own log line above says why",
            )
    if recent_deaths >= CRASH_LOOP_DEATHS:
        return Halt(
            ServiceExit.CRASH_LOOP,
            f"died {recent_deaths} times within {CRASH_LOOP_WINDOW_SECS:.0f} s ({death.how} last)",
        )
    return None


class DeathLog:
    """Times of recent deaths, per child name."""

    def __init__(self, window: float = CRASH_LOOP_WINDOW_SECS) -> None:
        self.window = window
        self._times: dict[str, deque[float]] = {}

    def record(self, name: str, now: float) -> int:
        """Record one death at ``now``; return how many fall within the window."""
        times = self._times.setdefault(name, deque())
        times.append(now)
        while times and now - times[0] > self.window:
            times.popleft()
        return len(times)
