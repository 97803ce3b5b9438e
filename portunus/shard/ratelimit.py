"""Per-rule rate limits that hold for the rule as a whole, across every shard.

A limiter inside one shard would let ``shards ×`` the cap through, so (like
``udp_budget``) the shards of one supervisor share a small mapped file per rule:
three token-bucket cells (bytes in, bytes out, new connections), each
``[magic, last refill ns, tokens (double), spare]``, updated under ``flock``
(CLOCK_MONOTONIC is one clock for all processes); live connections are counted
with ``udp_budget.FlowBudget`` in a second file.  A shard takes byte tokens in
chunks (1/50 s of rate, at most 256 KiB) and hands them to its pumps locally, so
the lock is taken ~50 times a second per rule whatever the connection count; a
shard short of tokens does not lock again until enough could be there.

Default bursts: bandwidth 1/20 s of rate (at least 64 KiB, so a UDP datagram
fits) -- a 1 s burst would add a second of cap to every transfer after an idle
spell (+10 % on a 10 s measurement, far outside the contract's ±2 %); new
connections 1 s of rate (at least 1).  ``bandwidth_*_bps`` are bytes per second.
Without a private directory each shard enforces an even share of every cap.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import time
from collections.abc import Callable
from typing import Any

from portunus.logs import log_event
from portunus.shard.metrics import RATE_LIMIT_DROPPED, RATE_LIMIT_REFUSED
from portunus.shard.udp_budget import FlowBudget, budget_dir, release_shared, sweep_stale

FILE_SIZE = 128
_MAGIC = 0x50524C42  # "PRLB"
_CELL_WORDS = 4
CELL_IN, CELL_OUT, CELL_CONN = 0, 1, 2
MAX_CHUNK = 256 * 1024
MIN_BW_BURST = 64 * 1024
MIN_WAIT = 0.001
LOG_EVERY_SECS = 10.0
_LOCK_TRIES = 64

# Defined with the shard's other series (forget_rule drops them with a rule).
REFUSED = RATE_LIMIT_REFUSED
DROPPED = RATE_LIMIT_DROPPED


def bandwidth_shape(rate: int, burst: int | None) -> tuple[float, float]:
    """(burst, chunk) in bytes for a bandwidth cap of ``rate`` bytes/s."""
    b = float(burst) if burst else float(max(rate // 20, MIN_BW_BURST))
    chunk = float(max(1, min(rate // 50, MAX_CHUNK, int(b // 2))))
    return b, chunk


def connection_shape(rate: int, burst: int | None) -> tuple[float, float]:
    """(burst, chunk) in connections for a cap of ``rate`` new connections/s."""
    return float(burst if burst else max(1, rate)), 1.0


class SharedCells:
    """The mapped bucket file of one rule (or a private buffer when not shared)."""

    __slots__ = ("fd", "mm", "q", "d")

    def __init__(self, path: str | None) -> None:
        self.fd = -1
        self.mm: mmap.mmap | None = None
        if path is None:
            raw = memoryview(bytearray(FILE_SIZE))
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size < FILE_SIZE:
                    os.ftruncate(fd, FILE_SIZE)
                self.mm = mmap.mmap(fd, FILE_SIZE)
            except OSError:
                os.close(fd)
                raise
            self.fd = fd
            raw = memoryview(self.mm)
        self.q: memoryview[int] | None = raw.cast("q")
        self.d: memoryview[float] | None = raw.cast("d")

    @property
    def shared(self) -> bool:
        return self.fd >= 0

    def lock(self) -> bool:
        """flock without stalling the loop: a few yields, else give up (caller retries)."""
        if self.fd < 0:
            return True
        for _ in range(_LOCK_TRIES):
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                os.sched_yield()
        return False

    def unlock(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for view in (self.q, self.d):
            if view is not None:
                view.release()
        self.q = self.d = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TokenBucket:
    """One capped quantity of a rule: ``rate`` tokens/s, at most ``burst`` saved.

    ``grant``/``refund`` serve ``CopyPump`` (a partial grant is fine for a stream);
    ``try_take`` is all-or-nothing (a datagram, a connection).  ``detach`` makes
    the bucket unlimited for whoever still holds it (the cap was lifted).
    """

    __slots__ = ("cells", "base", "rate", "burst", "chunk", "local", "seen", "seen_at", "clock")

    def __init__(
        self,
        cells: SharedCells,
        cell: int,
        rate: float,
        burst: float,
        chunk: float,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.cells: SharedCells | None = cells
        self.base = cell * _CELL_WORDS
        self.rate = 0.0
        self.burst = 0.0
        self.chunk = 1.0
        self.local = 0.0  # tokens this process took and has not handed out yet
        self.seen = 0.0  # shared tokens at the last refusal (no lock while short of them)
        self.seen_at = 0  # ns; 0 = nothing known, look
        self.clock = clock
        self.configure(rate, burst, chunk)

    def configure(self, rate: float, burst: float, chunk: float) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))
        self.chunk = max(1.0, min(float(chunk), self.burst))
        self.local = min(self.local, self.chunk)
        self.seen_at = 0

    def detach(self) -> None:
        self.cells = None
        self.rate = 0.0

    @property
    def limited(self) -> bool:
        return self.cells is not None

    def _take(self, need: float, want: float) -> tuple[float, float]:
        """Refill the shared bucket and take ``want`` (at least ``need``) tokens.

        Returns (tokens taken, seconds until ``need`` would be there).
        """
        if self.seen_at:
            # Short of tokens last time: skip the lock until enough could be there.
            now = self.clock()
            short = need - self.seen - (now - self.seen_at) * self.rate / 1e9
            if short > 0:
                return 0.0, max(MIN_WAIT, short / self.rate)
            self.seen_at = 0
        cells = self.cells
        assert cells is not None
        if not cells.lock():
            return 0.0, MIN_WAIT
        try:
            q, d = cells.q, cells.d
            assert q is not None and d is not None
            b = self.base
            now = self.clock()
            if q[b] != _MAGIC:
                q[b] = _MAGIC
                q[b + 1] = now
                d[b + 2] = self.burst
            elapsed = now - q[b + 1]
            tokens = d[b + 2]
            if elapsed > 0:
                tokens += elapsed * self.rate / 1e9
                q[b + 1] = now
            tokens = min(tokens, self.burst)
            if tokens >= need:
                got = min(tokens, max(want, need))
                d[b + 2] = tokens - got
                return got, 0.0
            d[b + 2] = tokens
            self.seen, self.seen_at = tokens, now
            return 0.0, max(MIN_WAIT, (need - tokens) / self.rate)
        finally:
            cells.unlock()

    def grant(self, n: int) -> tuple[int, float]:
        """Up to ``n`` bytes may be read now, or none and how long to wait."""
        if self.cells is None:
            return n, 0.0
        if self.local < 1.0:
            got, wait = self._take(self.chunk, self.chunk)
            if not got:
                return 0, wait
            self.local += got
        g = min(n, int(self.local))
        self.local -= g
        return g, 0.0

    def refund(self, n: int) -> None:
        """Granted bytes that were not read: keep them for the next read."""
        if self.cells is not None and n > 0:
            self.local += n

    def try_take(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens at once or none (more than ``burst`` never passes)."""
        if self.cells is None:
            return True
        if self.local >= n:
            self.local -= n
            return True
        need = n - self.local
        got, _wait = self._take(need, max(need, self.chunk))
        if not got:
            return False
        self.local += got - n
        return True


# ------------------------------------------------------------ one rule's limits


class RuleLimits:
    """Every limiter of one rule in this shard process, updated in place.

    Shared by the runtimes of the rule (an update builds a new runtime before the
    old one goes), refcounted through ``acquire_limits``/``release_limits``.
    ``owner_limits.OwnerLimits`` is the same set for all of an owner's rules.
    """

    # The ``limit`` label of portunus_rate_limit_refused_total for each refusal.
    CONCURRENT = "concurrent_connections"
    NEW_CONNECTIONS = "new_connections_per_sec"

    def __init__(
        self, settings: dict[str, Any], client: str, rule_id: str, labels: tuple[str, ...]
    ) -> None:
        self.rule_id = rule_id
        self.labels = labels
        self.users = 0
        self.shards = max(1, int(settings.get("shards", 1) or 1))
        owner = os.environ.get("PORTUNUS_SUPERVISOR_PID") or str(os.getpid())
        digest = hashlib.sha1(f"{client}\0{rule_id}".encode()).hexdigest()[:20]
        directory = budget_dir(settings)
        self.path = os.path.join(directory, f"{owner}-{digest}") if directory else None
        if directory:
            sweep_stale(directory, owner, (".rl", ".conns.flows"))
        self.cells: SharedCells | None = None
        self.bw_in: TokenBucket | None = None
        self.bw_out: TokenBucket | None = None
        self.conn_rate: TokenBucket | None = None
        self.concurrent: FlowBudget | None = None
        self.refused: dict[str, int] = {}
        self.last_log = -LOG_EVERY_SECS

    @property
    def shared(self) -> bool:
        return self.path is not None if self.cells is None else self.cells.shared

    def _cells(self) -> SharedCells:
        if self.cells is None:
            try:
                self.cells = SharedCells(self.path + ".rl" if self.path else None)
            except OSError as exc:
                log_event("rate_limit.unshared", level="warning", rule=self.rule_id, error=str(exc))
                self.cells = SharedCells(None)
        return self.cells

    def _share(self, value: float) -> float:
        """A cap for this shard: the whole cap when shared, an even share when not."""
        return value if self.shared else max(1.0, value / self.shards)

    def _bucket(
        self,
        old: TokenBucket | None,
        cell: int,
        rate: int | None,
        burst: int | None,
        shape: Callable[[int, int | None], tuple[float, float]],
    ) -> TokenBucket | None:
        if rate is None:
            if old is not None:
                old.detach()
            return None
        cells = self._cells()
        b, chunk = shape(rate, burst)
        r, b = self._share(rate), self._share(b)
        if old is not None and old.limited:
            old.configure(r, b, chunk)
            return old
        return TokenBucket(cells, cell, r, b, chunk)

    def configure(self, rate_limit: dict[str, int] | None) -> None:
        rl = rate_limit or {}
        self.bw_in = self._bucket(
            self.bw_in,
            CELL_IN,
            rl.get("bandwidth_in_bps"),
            rl.get("bandwidth_in_bps_burst"),
            bandwidth_shape,
        )
        self.bw_out = self._bucket(
            self.bw_out,
            CELL_OUT,
            rl.get("bandwidth_out_bps"),
            rl.get("bandwidth_out_bps_burst"),
            bandwidth_shape,
        )
        self.conn_rate = self._bucket(
            self.conn_rate,
            CELL_CONN,
            rl.get("new_connections_per_sec"),
            rl.get("new_connections_per_sec_burst"),
            connection_shape,
        )
        # concurrent_connections_burst has no meaning for a live count: accepted, ignored.
        cap = rl.get("concurrent_connections")
        if cap is None and self.concurrent is not None:
            self.concurrent.close()  # holders still release into it, harmlessly
            self.concurrent = None
        elif cap is not None and self.concurrent is not None:
            self.concurrent.limit = cap if self.concurrent.shared else max(1, cap // self.shards)
        elif cap is not None:
            try:
                self.concurrent = FlowBudget(cap, self.path + ".conns.flows") if self.path else None
            except OSError as exc:
                log_event("rate_limit.unshared", level="warning", rule=self.rule_id, error=str(exc))
            self.concurrent = self.concurrent or FlowBudget(max(1, cap // self.shards))

    def admit(self, labels: tuple[str, ...] | None = None) -> tuple[bool, FlowBudget | None]:
        """(admitted, the live-connection budget the caller must ``release`` into).

        ``labels`` are the refused connection's rule labels (default: this rule's).
        """
        slot = self.concurrent
        if slot is not None and not slot.try_acquire():
            self.refuse(self.CONCURRENT, labels)
            return False, None
        rate = self.conn_rate
        if rate is not None and not rate.try_take(1.0):
            if slot is not None:
                slot.release()
            self.refuse(self.NEW_CONNECTIONS, labels)
            return False, None
        return True, slot

    def unadmit(self, slot: FlowBudget | None) -> None:
        """Give back what ``admit`` took (another layer refused the connection)."""
        if slot is not None:
            slot.release()
        if self.conn_rate is not None:
            self.conn_rate.refund(1)

    def refuse(self, limit: str, labels: tuple[str, ...] | None = None) -> None:
        labels = labels or self.labels
        REFUSED.labels(*labels, limit).inc()
        self.refused[limit] = self.refused.get(limit, 0) + 1
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY_SECS:
            self.last_log = now
            counts, self.refused = self.refused, {}
            for name, count in counts.items():
                log_event(
                    "rate_limit.refused",
                    level="warning",
                    rule=labels[1],
                    owner=labels[2],
                    limit=name,
                    count=count,
                )

    def close(self) -> None:
        for b in (self.bw_in, self.bw_out, self.conn_rate):
            if b is not None:
                b.detach()
        self.bw_in = self.bw_out = self.conn_rate = None
        if self.concurrent is not None:
            self.concurrent.close()
            self.concurrent = None
        if self.cells is not None:
            self.cells.close()
            self.cells = None


_LIMITS: dict[tuple[str, str], RuleLimits] = {}


def acquire_limits(
    settings: dict[str, Any],
    client: str,
    rule_id: str,
    labels: tuple[str, ...],
    rate_limit: dict[str, int],
) -> RuleLimits:
    """This process's limiters of a rule, (re)configured for ``rate_limit``."""
    key = (client, rule_id)
    limits = _LIMITS.get(key)
    if limits is None:
        limits = _LIMITS[key] = RuleLimits(settings, client, rule_id, labels)
    limits.configure(rate_limit)
    limits.users += 1
    return limits


def release_limits(limits: RuleLimits) -> None:
    release_shared(_LIMITS, limits)
