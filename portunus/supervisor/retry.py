"""When to retry binding a failed rule (e.g. ``port_in_use``).

A rule whose port was taken stays ``failed`` until its port frees: the supervisor
tries to bind it again after 1 s, then 2, 4, ... up to 30 s between tries, and
reports ``active`` to its rule source when a try succeeds.  ``retry-rule ID`` (an
upsert of the same rule) tries at once and starts the backoff over.
"""

from __future__ import annotations

RETRY_FIRST_SECS = 1.0
RETRY_MAX_SECS = 30.0


class RetrySchedule:
    """rule id -> (next try, current delay)."""

    def __init__(self, first: float = RETRY_FIRST_SECS, cap: float = RETRY_MAX_SECS) -> None:
        self.first = first
        self.cap = cap
        self._due: dict[str, tuple[float, float]] = {}

    def track(self, failed: set[str], now: float) -> None:
        """Follow exactly the ``failed`` ids: new ones start at ``first``, gone ones drop."""
        for rid in list(self._due):
            if rid not in failed:
                del self._due[rid]
        for rid in failed:
            self._due.setdefault(rid, (now + self.first, self.first))

    def restart(self, rid: str, now: float) -> None:
        """A fresh attempt was just made (an upsert): back off from the start."""
        self._due[rid] = (now + self.first, self.first)

    def due(self, now: float) -> list[str]:
        return [rid for rid, (at, _) in self._due.items() if at <= now]

    def failed_again(self, rid: str, now: float) -> None:
        _, delay = self._due.get(rid, (now, self.first))
        delay = min(self.cap, delay * 2)
        self._due[rid] = (now + delay, delay)

    def next_at(self) -> float | None:
        return min((at for at, _ in self._due.values()), default=None)
