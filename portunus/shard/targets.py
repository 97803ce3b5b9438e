"""Which target of a rule a shard connects to next: priorities, down marks, recovery.

One ``TargetSet`` per rule per shard.  The connection handler walks
``candidates()`` in order and reports each connect attempt; a failed connect falls
through to the next candidate inside the same client connection.  A target that
fails ``fail_threshold`` connects within ``fail_window`` seconds is marked down and
only comes back after ``recover_successes`` consecutive health probes succeed.
When every target is down they are all tried anyway, in priority order: a guess beats refusing the client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import traceback
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from portunus.logs import log_event
from portunus.rules import Target


def weak_hook(method: Callable[[Target, bool], None]) -> Callable[[Target, bool], None]:
    """An ``on_change`` that calls ``method`` while its object lives.  The rule
    runtime owns its TargetSet: handing it a bound method would make a cycle that
    keeps a removed rule's runtime alive until a full GC pass."""
    ref = weakref.WeakMethod(method)

    def hook(target: Target, up: bool) -> None:
        bound = ref()
        if bound is not None:
            bound(target, up)

    return hook


class TargetState:
    """Health bookkeeping of one target inside one shard."""

    __slots__ = ("target", "up", "failures", "health_successes")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.up = True
        self.failures: deque[float] = deque()  # clock() of recent failed connects
        self.health_successes = 0  # consecutive successful probes while down


class TargetSet:
    """The targets of one rule in priority order (lower number first, stable)."""

    def __init__(
        self,
        targets: Sequence[Target],
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[Target, bool], None] | None = None,
        fail_threshold: int = 3,
        fail_window: float = 30.0,
        recover_successes: int = 2,
    ) -> None:
        if not targets:
            raise ValueError("a TargetSet needs at least one target")
        self._clock = clock
        self._on_change = on_change
        self.fail_threshold = fail_threshold
        self.fail_window = fail_window
        self.recover_successes = recover_successes
        # sorted() is stable: equal priorities keep the rule's order.  Identical
        # targets collapse into one state (they are the same upstream).
        ordered = dict.fromkeys(sorted(targets, key=lambda t: t.priority))
        self._states = {t: TargetState(t) for t in ordered}
        self._all = list(ordered)
        self._up = list(ordered)

    @property
    def states(self) -> list[TargetState]:
        return list(self._states.values())

    @property
    def any_down(self) -> bool:
        return len(self._up) < len(self._all)

    def is_up(self, target: Target) -> bool:
        return self._states[target].up

    def candidates(self) -> list[Target]:
        """Targets to try, in order, for a new connection (hot path: no allocation
        beyond the returned list)."""
        return list(self._up or self._all)

    def report_failure(self, target: Target) -> None:
        """A connect to ``target`` failed (refused, timed out, unreachable)."""
        state = self._states[target]
        now = self._clock()
        failures = state.failures
        failures.append(now)
        horizon = now - self.fail_window
        while failures and failures[0] <= horizon:
            failures.popleft()
        state.health_successes = 0
        if state.up and len(failures) >= self.fail_threshold:
            failures.clear()
            self._set(state, False)

    def report_success(self, target: Target) -> None:
        """A real connection to ``target`` succeeded: its recent failures no longer
        count.  It does not bring a down target back; only health probes do."""
        self._states[target].failures.clear()

    async def health_loop(
        self, interval: float, probe: Callable[[Target], Awaitable[bool]]
    ) -> None:
        """Probe the down targets every ``interval`` seconds until cancelled.

        Runs as a task in the shard for the rule's lifetime.  A probe that raises or
        outlasts ``max(interval, 1)`` seconds counts as a failed probe; nothing but
        CancelledError leaves this loop.
        """
        while True:
            await asyncio.sleep(interval)
            down = [s for s in self._states.values() if not s.up]
            if down:
                results = await asyncio.gather(
                    *(self._probe(probe, s.target, max(interval, 1.0)) for s in down)
                )
                for state, ok in zip(down, results, strict=True):
                    if state.up:
                        continue
                    if not ok:
                        state.health_successes = 0
                        continue
                    state.health_successes += 1
                    if state.health_successes >= self.recover_successes:
                        state.failures.clear()
                        self._set(state, True)

    @staticmethod
    async def _probe(
        probe: Callable[[Target], Awaitable[bool]], target: Target, limit: float
    ) -> bool:
        try:
            async with asyncio.timeout(limit):
                return bool(await probe(target))
        except TimeoutError:
            return False
        except Exception:  # a broken probe must not end health checking for the rule
            log_event(
                "target.probe_error",
                level="error",
                target=target.label,
                error=traceback.format_exc(),
            )
            return False

    def _set(self, state: TargetState, up: bool) -> None:
        state.up = up
        state.health_successes = 0
        self._up = [t for t, s in self._states.items() if s.up]
        # The on_change owner logs target.up/target.down with the rule id.
        if self._on_change is not None:
            try:
                self._on_change(state.target, up)
            except Exception:  # the callback is the caller's code; the state is ours
                log_event(
                    "target.on_change_error",
                    level="error",
                    target=state.target.label,
                    error=traceback.format_exc(),
                )


async def tcp_probe(host_addrs: list[str], port: int, timeout: float) -> bool:
    """True once a TCP connect to one of ``host_addrs`` succeeds (closed at once).

    Addresses are tried in order, each with its own ``timeout``.
    """
    loop = asyncio.get_running_loop()
    for addr in host_addrs:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (addr, port))
            return True
        except (OSError, TimeoutError):
            continue
        finally:
            sock.close()
    return False


def is_ip(host: str) -> bool:
    """A literal address (no resolution needed), not a DNS name."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
