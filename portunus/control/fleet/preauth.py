"""Admission of edge connections that have not authenticated yet.

``control_listen`` defaults to 0.0.0.0:7443, so anyone who can reach the server
talks to the gateway before presenting a credential.  Until its first frame
authenticates it (``hello`` with a valid client token) or redeems a code
(``enroll``), a connection is anonymous, and what it may cost is bounded here:

- its first frame is at most ``PREAUTH_MAX_FRAME`` bytes; a longer length prefix
  closes the connection before any of the body is read;
- at most ``max_per_source`` connections from one source address are anonymous
  at once; one more waits, accepted but unread (``listener.Parking``), for a slot
  of its source, and is reset when the parking lot is full or it waited
  ``edge_preauth_park_secs`` (25 s: an edge client's connect budget is 30 s);
- at most ``max_connections`` are anonymous at once.  One more first reclaims
  the anonymous connection that has waited longest for its TLS handshake and
  first frame (its deadline is brought forward to now; counted as ``evicted``):
  slow peers from many addresses, however many, cannot lock out a real client,
  whose handshake and first frame take milliseconds.  Only when no connection
  is still in that phase (every one is being enrolled or authenticated) is the
  new one closed right after ``accept``;
- the TLS handshake and the first frame share one deadline
  (``edge_handshake_timeout_secs``);
- a refused enrollment is audited, but at most ``AUDIT_BURST`` in a row and then
  one per ``AUDIT_EVERY_SECS`` (``AuditBudget``): a peer that sends one bad code
  per connection must not grow the audit table at the rate it can connect.  The
  next audited row says how many went unaudited; every one is counted.

Every refusal is counted (``portunus_edge_preauth_refused_total{reason}``) and
logged through the process's log throttle, so a flood costs neither a journal
line nor a metrics write per connection beyond the counter increment.

Sizes measured for this build (tests/unit/control/fleet/test_edge_preauth.py
recomputes them and fails if a legitimate frame would not fit):

- ``hello`` as ``portunus-client`` sends it: 236 bytes with its 4-byte prefix
  (43-character token, 26-character client id, the 8 rule capabilities and
  ``quiet_link``); ``enroll``: 81 bytes.
- The largest ``hello`` whose every field the server still reads (a 512-character
  token, the 64 capabilities of 64 characters it keeps, a 64-character version):
  4,966 bytes.  ``PREAUTH_MAX_FRAME`` (8 KiB) is that with a margin of 65 %.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from portunus.logs import log_throttled

PREAUTH_MAX_FRAME = 8 * 1024
DEFAULT_MAX_CONNECTIONS = 128
DEFAULT_MAX_PER_SOURCE = 16
DEFAULT_HANDSHAKE_TIMEOUT_SECS = 10.0
# The longest a connection over its source's quota waits parked: inside an edge
# client's connect budget (portunus.edge.timing.LinkTiming.connect_timeout, 30 s),
# with 5 s left for its TLS handshake once admitted.
DEFAULT_PARK_SECS = 25.0

AUDIT_BURST = 30
AUDIT_EVERY_SECS = 2.0

# Values of the ``reason`` label, all known up front so /metrics shows zeros.  The
# last two are first frames that were read but carried a bad credential.
REASONS = (
    "max_connections",
    "evicted",
    "max_per_source",
    "frame_too_large",
    "timeout",
    "enrollment_invalid",
    "unauthenticated",
)


class PreauthSlot:
    """One admitted anonymous connection; ``release`` when it authenticated or ended.

    ``on_evict`` is set while the connection waits for its TLS handshake and
    first frame (the phase a slow peer can stretch): calling it ends that wait
    at once.  ``evicted`` tells the gateway why the wait ended.
    """

    __slots__ = ("_limits", "source", "_held", "on_evict", "evicted")

    def __init__(self, limits: PreauthLimits, source: str) -> None:
        self._limits = limits
        self.source = source
        self._held = True
        self.on_evict: Callable[[], None] | None = None
        self.evicted = False

    def release(self) -> None:
        """Idempotent: the gateway releases on authentication and again on close."""
        if self._held:
            self._held = False
            self._limits._release(self)


class PreauthLimits:
    """Counts anonymous connections, globally and per source address."""

    def __init__(
        self,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_source: int = DEFAULT_MAX_PER_SOURCE,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.on_refused = on_refused or (lambda reason: None)
        self.open = 0
        self.per_source: dict[str, int] = {}
        self._slots: dict[PreauthSlot, None] = {}  # the held ones, oldest first
        # Called with the source whose slot was just released (listener.Parking
        # hands that slot to a connection waiting for it).
        self.on_release: Callable[[str], None] | None = None

    @property
    def full(self) -> bool:
        """Every anonymous slot is held (a newcomer would have to reclaim one)."""
        return self.open >= self.max_connections

    def admit(self, source: str) -> PreauthSlot | str:
        """A slot for a fresh connection from ``source`` (reclaiming the longest
        waiting one at the global limit), or the refusal reason."""
        held = self.per_source.get(source, 0)
        if held >= self.max_per_source:
            return "max_per_source"
        if self.open >= self.max_connections and not self._reclaim():
            return "max_connections"
        self.open += 1
        self.per_source[source] = held + 1
        slot = PreauthSlot(self, source)
        self._slots[slot] = None
        return slot

    def _reclaim(self) -> bool:
        """End the wait of the oldest connection still in its handshake or first
        frame and give its slot back; False when there is none.  (One whose first
        frame arrives in the same loop iteration still goes on, without a slot.)"""
        victim = next((s for s in self._slots if s.on_evict is not None), None)
        if victim is None or victim.on_evict is None:
            return False
        evict, victim.on_evict = victim.on_evict, None
        victim.evicted = True
        victim.release()
        evict()
        return True

    def _release(self, slot: PreauthSlot) -> None:
        self._slots.pop(slot, None)
        self.open -= 1
        left = self.per_source.get(slot.source, 0) - 1
        if left > 0:
            self.per_source[slot.source] = left
        else:
            self.per_source.pop(slot.source, None)
        if self.on_release is not None:
            self.on_release(slot.source)

    def count(self, reason: str) -> None:
        """Count one refusal that the caller logs itself."""
        self.on_refused(reason)

    def refused(self, reason: str, peer: str | None, **fields: object) -> None:
        """Count and (throttled) log one refusal."""
        self.on_refused(reason)
        log_throttled(
            f"edge.preauth_refused.{reason}",
            level="warning",
            reason=reason,
            peer=peer,
            open=self.open,
            max_connections=self.max_connections,
            max_per_source=self.max_per_source,
            **fields,
        )


class AuditBudget:
    """A token bucket for audit rows written on behalf of anonymous peers."""

    def __init__(
        self,
        burst: int = AUDIT_BURST,
        every_secs: float = AUDIT_EVERY_SECS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.every_secs = every_secs
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()
        self.skipped = 0

    def take(self) -> int | None:
        """None when this one goes unaudited; else how many went unaudited before
        it (the count then starts again)."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) / self.every_secs)
        self.stamp = now
        if self.tokens < 1.0:
            self.skipped += 1
            return None
        self.tokens -= 1.0
        skipped, self.skipped = self.skipped, 0
        return skipped
