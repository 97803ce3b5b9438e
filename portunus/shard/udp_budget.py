"""``udp_max_flows`` for a rule as a whole: live UDP flows counted across shards.

Each shard is a separate process and the kernel spreads client flows over them,
so a per-shard limit would allow ``shards × udp_max_flows`` flows.  Instead the
shards of one supervisor share a tiny file per rule, mapped into memory: one
``(pid, live flows)`` slot per shard process.  A shard writes only its own slot;
admitting a flow takes an ``flock`` on the file, sums the slots and bumps its own,
so two shards cannot both take the last flow.  Releasing a flow writes the slot
without the lock (only its owner writes it; a reader sees the old or new value,
both safe).  A slot whose pid has died (a crashed shard) is reclaimed when the
sum says "full", so a crash never leaks capacity for long.

Layout (native int64 words): ``[magic, slots_in_use, pid0, count0, pid1, ...]``.
When no private directory is available, the budget falls back to a per-shard
share (``udp_max_flows // shards``) and says so in the log.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import stat
import time
from typing import Any

from portunus.logs import log_event
from portunus.text import is_ascii_digits

FILE_SIZE = 4096
_MAGIC = 0x50554446  # "PUDF"
_HEADER_WORDS = 2
MAX_SLOTS = (FILE_SIZE // 8 - _HEADER_WORDS) // 2
# After a refusal, more admissions are refused without looking at the file for
# this long: a flood of datagrams from new sources must not cost a lock each.
# A flow released in this shard clears it at once.
FULL_RECHECK_SECS = 0.1
_LOCK_TRIES = 64


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FlowBudget:
    """Live flows of one rule: this process's count, checked against the sum."""

    __slots__ = ("limit", "local", "full_until", "users", "key", "_fd", "_mm", "_words", "_slot")

    def __init__(self, limit: int, path: str | None = None) -> None:
        self.limit = limit
        self.local = 0
        self.full_until = 0.0
        self.users = 0
        self.key = path or ""
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._words: memoryview | None = None
        self._slot = -1
        if path is not None:
            self._open(path)

    @property
    def shared(self) -> bool:
        return self._words is not None

    def _open(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < FILE_SIZE:
                os.ftruncate(fd, FILE_SIZE)  # zero-filled; a no-op if a peer did it first
            mm = mmap.mmap(fd, FILE_SIZE)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._mm = fd, mm
        self._words = memoryview(mm).cast("q")
        fcntl.flock(fd, fcntl.LOCK_EX)  # once per rule per shard: a short wait is fine
        try:
            self._claim()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _claim(self) -> None:
        """Take this process's slot (its old one, a free one or a dead pid's). Locked."""
        w = self._words
        assert w is not None
        if w[0] != _MAGIC:
            w[0] = _MAGIC
        me = os.getpid()
        used = w[1]
        pick = -1
        for i in range(used):
            if w[2 + 2 * i] == me:
                pick = i
                break
        if pick < 0:
            for i in range(used):
                pid = w[2 + 2 * i]
                if pid == 0 or not _alive(pid):
                    pick = i
                    break
        if pick < 0:
            if used >= MAX_SLOTS:
                raise OSError(errno.ENOSPC, "no free flow-count slot")
            pick = used
            w[1] = used + 1
        w[2 + 2 * pick] = me
        w[3 + 2 * pick] = self.local
        self._slot = 3 + 2 * pick

    def _total(self) -> int:
        w = self._words
        assert w is not None
        used = min(w[1], MAX_SLOTS)
        return sum(w[3 : 2 + 2 * used : 2])

    def _reclaim_dead(self) -> None:
        """Zero the slots of shard processes that died with flows open.  Locked."""
        w = self._words
        assert w is not None
        me = os.getpid()
        for i in range(min(w[1], MAX_SLOTS)):
            pid = w[2 + 2 * i]
            if pid not in (0, me) and w[3 + 2 * i] and not _alive(pid):
                w[3 + 2 * i] = 0
                w[2 + 2 * i] = 0

    def _lock(self) -> bool:
        """Try the file lock without ever blocking the event loop for long.

        The holder keeps it for microseconds; a few yields normally get it.  If a
        peer is wedged while holding it, admission goes on unlocked (the limit may
        then be overshot by at most one flow per shard) rather than stall traffic.
        """
        for _ in range(_LOCK_TRIES):
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                os.sched_yield()
        return False

    def try_acquire(self) -> bool:
        """Admit one more flow if the rule (all shards) is below its limit."""
        if self.local >= self.limit:
            return False
        w = self._words
        if w is None:
            self.local += 1
            return True
        now = time.monotonic()
        if now < self.full_until:
            return False
        locked = self._lock()
        try:
            total = self._total()
            if total >= self.limit and locked:
                self._reclaim_dead()
                total = self._total()
            if total >= self.limit:
                self.full_until = now + FULL_RECHECK_SECS
                return False
            self.local += 1
            w[self._slot] = self.local
            return True
        finally:
            if locked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def hold(self) -> None:
        """Count a flow that is already open (it was admitted before this budget
        existed): it must count against the cap from now on, and release into it."""
        self.local += 1
        self.full_until = 0.0
        if self._words is not None:
            self._words[self._slot] = self.local

    def release(self) -> None:
        """One flow of this process ended."""
        if self.local > 0:
            self.local -= 1
        self.full_until = 0.0
        if self._words is not None:
            self._words[self._slot] = self.local

    def total(self) -> int:
        """Flows of the rule in every shard (this process only when not shared)."""
        return self._total() if self._words is not None else self.local

    def close(self) -> None:
        """Give the slot back; runs when the last service of the rule in this shard closes."""
        w = self._words
        if w is not None:
            w[self._slot] = 0
            w[self._slot - 1] = 0
            w.release()
            self._words = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ------------------------------------------------------------------ registry

_BUDGETS: dict[tuple[int, str], FlowBudget] = {}
_SWEPT: set[tuple[str, tuple[str, ...]]] = set()


def budget_dir(settings: dict[str, Any]) -> str | None:
    """A directory only this installation can write: ``<runtime_dir>/udp-flows``.

    A world-writable runtime dir (standalone without a runtime dir uses /tmp) is not
    used for files a root process opens by a predictable name; the private
    multiprocess metrics dir (wiped at every start) serves instead.
    """
    base = str(settings.get("runtime_dir") or "")
    try:
        if base and not os.stat(base).st_mode & stat.S_IWOTH:
            path = os.path.join(base, "udp-flows")
            os.makedirs(path, mode=0o700, exist_ok=True)
            return path
    except OSError:
        pass
    metrics = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics and os.path.isdir(metrics):
        return metrics
    return None


def sweep_stale(directory: str, mine: str, suffixes: tuple[str, ...] = (".flows",)) -> None:
    """Delete shared files (``<supervisor pid>-...<suffix>``) left by supervisors that
    are gone; once per directory per process (udp budgets and rate limiters alike)."""
    if (directory, suffixes) in _SWEPT:
        return
    _SWEPT.add((directory, suffixes))
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        prefix, sep, _rest = name.partition("-")
        if not sep or not name.endswith(suffixes) or prefix == mine or not is_ascii_digits(prefix):
            continue
        if not _alive(int(prefix)):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def release_shared(registry: dict[Any, Any], obj: Any) -> None:
    """Drop one user of a refcounted per-rule object; close it with its last user."""
    obj.users -= 1
    if obj.users > 0:
        return
    for key, other in list(registry.items()):
        if other is obj:
            del registry[key]
    obj.close()


def acquire_budget(settings: dict[str, Any], client: str, rule_id: str) -> FlowBudget:
    """The shared budget of a rule for this shard process (refcounted per service)."""
    limit = max(1, int(settings.get("udp_max_flows", 1024)))
    shards = max(1, int(settings.get("shards", 1) or 1))
    owner = os.environ.get("PORTUNUS_SUPERVISOR_PID") or str(os.getpid())
    digest = hashlib.sha1(f"{client}\0{rule_id}".encode()).hexdigest()[:20]
    directory = budget_dir(settings)
    path = os.path.join(directory, f"{owner}-{digest}.flows") if directory else None
    key = (os.getpid(), path or f"local:{client}\0{rule_id}")
    budget = _BUDGETS.get(key)
    if budget is None:
        try:
            budget = FlowBudget(limit, path) if path else None
        except OSError as exc:
            log_event("udp.flow_budget_unshared", level="warning", rule=rule_id, error=str(exc))
            budget = None
        if budget is None:
            # No shared file: an honest per-shard share of the limit instead.
            budget = FlowBudget(max(1, limit // shards))
        else:
            assert directory is not None
            sweep_stale(directory, owner)
        _BUDGETS[key] = budget
    else:
        budget.limit = limit if budget.shared else max(1, limit // shards)
    budget.users += 1
    return budget


def release_budget(budget: FlowBudget) -> None:
    release_shared(_BUDGETS, budget)
