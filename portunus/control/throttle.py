"""Login throttling per (user id, source address), in the control process.

Five failures within 15 minutes lock the pair out: 60 s the first time, then
doubling on each further lockout up to 15 minutes; a success (or 15 quiet
minutes after the last failure or lockout) forgets the pair.  While locked, attempts are refused with
``rate_limited`` before any password is checked, and the answer says when to
retry.  Memory is bounded: the oldest pairs are forgotten past ``MAX_KEYS``.
Throttle state does not survive a restart of the control process.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from portunus.errors import PortunusError

WINDOW_SECS = 15 * 60.0
MAX_FAILURES = 5
LOCK_FIRST_SECS = 60.0
LOCK_MAX_SECS = 15 * 60.0
MAX_KEYS = 10_000


@dataclass
class _Pair:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0
    lock_secs: float = 0.0
    last: float = 0.0


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._pairs: OrderedDict[tuple[str, str], _Pair] = OrderedDict()

    def check(self, key: tuple[str, str]) -> None:
        pair = self._pairs.get(key)
        now = self.clock()
        if pair is None:
            return
        if pair.locked_until > now:
            wait = max(1, math.ceil(pair.locked_until - now))
            raise PortunusError(
                "rate_limited", f"too many failed logins; try again in {wait} s", retry_after=wait
            )
        if now - max(pair.last, pair.locked_until) > WINDOW_SECS:
            del self._pairs[key]  # quiet for a whole window after the last lockout: start over

    def failure(self, key: tuple[str, str]) -> None:
        now = self.clock()
        pair = self._pairs.pop(key, None) or _Pair()
        self._pairs[key] = pair  # most recent last
        pair.last = now
        pair.failures.append(now)
        while pair.failures and now - pair.failures[0] > WINDOW_SECS:
            pair.failures.popleft()
        if len(pair.failures) >= MAX_FAILURES:
            pair.lock_secs = (
                LOCK_FIRST_SECS if pair.lock_secs == 0 else min(pair.lock_secs * 2, LOCK_MAX_SECS)
            )
            pair.locked_until = now + pair.lock_secs
            pair.failures.clear()
        while len(self._pairs) > MAX_KEYS:
            self._pairs.popitem(last=False)

    def success(self, key: tuple[str, str]) -> None:
        self._pairs.pop(key, None)
