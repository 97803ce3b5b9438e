"""Multiprocess metric values whose files shrink again when series are forgotten.

prometheus_client's multiprocess mode keeps each process's values in mmap files
(``<type>_<pid>.db``) that only grow: a label set once written stays in the file,
and its value object stays in a module-level list, for the life of the process
(client_python issue #720).  Under rule churn every pushed rule adds its series
to every shard's files and rule-state rows to control's, so those processes grew
with the number of rules ever pushed and every /metrics scrape read more.

``CompactingValue`` replaces prometheus_client's value class (``install()``) with
the same files, the same format and the same readers, but it knows which series
are still in use.  A series is *dead* once its rule is retired
(``retire_rule``, called by ``shard.metrics.forget_rule`` and for a removed
rule's state rows in control), or once no metric child holds its value any more
(values are held by weak reference).  Retiring does not wait for the garbage
collector: a drained rule's runtime may sit in a reference cycle for a while.
``maybe_compact()`` rewrites a file without this process's dead series once they
are many, into a temporary file that is renamed over the original: a reader (the
web process's /metrics, control's rule-stats) opens either the whole old file or
the whole new one, never a half-written file.  Only the owning process writes
its files, so no lock between processes is needed; within the process, writes
and the rewrite hold ``_LOCK`` as prometheus_client's own value class does.

What a rewrite keeps: every series with a live value that is not retired, at
its current value (a counter of a rule that still exists never goes backwards),
and every entry this process did not create itself (a file inherited through pid
reuse keeps the dead process's counts).  A retired series whose value is written
again is written back whole, at its in-memory value.  A removed rule's series
leave /metrics with the rewrite; a rule pushed again later under the same id
starts from zero, like any new series.
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from typing import Any

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

# Rewrite a file once this many of its series are dead and they are at least half
# as many as the live ones (so a rewrite costs O(1) per dead series), at most
# once per MIN_INTERVAL_SECS per process.
MIN_DEAD = 256
MIN_INTERVAL_SECS = 10.0
_TMP_SUFFIX = ".compacting"  # not *.db: the collectors never read a half-written file

_LOCK = threading.Lock()


class _File:
    """One ``<prefix>_<pid>.db`` of this process and the values bound to it."""

    __slots__ = ("path", "data", "owned", "live", "retired")

    def __init__(self, path: str) -> None:
        self.path = path
        # An existing file (pid reuse) is continued; a new one appears whole.
        self.data = MmapedDict(path) if os.path.exists(path) else _publish(path, [])
        self.owned: set[str] = set()  # keys this process made a value for
        self.live: weakref.WeakSet[CompactingValue] = weakref.WeakSet()
        self.retired: set[str] = set()  # keys of retired rules, dropped at the next rewrite

    def dead_estimate(self) -> int:
        """A lower bound of the dead keys in O(1): every retired key is dead, and
        so is every owned key beyond the live values.  (Their sum would count a
        retired key whose value also died twice, and a rewrite found not worth it
        would still spend the rate bound.)"""
        return max(len(self.owned) - len(self.live), len(self.retired))


class _State:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.files: dict[str, _File] = {}
        self.values: weakref.WeakSet[CompactingValue] = weakref.WeakSet()
        # (client, rule) label values -> (file prefix, key) of every series of that rule
        self.by_rule: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self.last_compaction = float("-inf")


_state = _State()


def _file_for(prefix: str) -> _File:
    f = _state.files.get(prefix)
    if f is None:
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        f = _state.files[prefix] = _File(os.path.join(directory, f"{prefix}_{_state.pid}.db"))
    return f


def _check_fork() -> None:
    """After a fork, the child writes its own files (like prometheus_client does):
    values inherited from the parent are rebound, starting from the child's file."""
    pid = os.getpid()
    if pid == _state.pid:
        return
    for f in _state.files.values():
        f.data.close()  # the child's copy of the mapping; the parent keeps its own
    _state.pid = pid
    _state.files = {}
    _state.by_rule = {}
    _state.last_compaction = float("-inf")
    for v in list(_state.values):
        v._bind()


class CompactingValue:
    """A float in this process's mmap file; drop-in for prometheus_client's
    ``MmapedValue`` (same file names, same keys, same format)."""

    _multiprocess = True
    __slots__ = ("_prefix", "_key", "_rule", "_file", "_value", "_timestamp", "__weakref__")

    def __init__(
        self,
        typ: str,
        metric_name: str,
        name: str,
        labelnames: Any,
        labelvalues: Any,
        help_text: str,
        multiprocess_mode: str = "",
        **kwargs: Any,
    ) -> None:
        self._prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        labels = dict(zip(labelnames, labelvalues, strict=False))
        client, rule = labels.get("client"), labels.get("rule")
        self._rule = (str(client), str(rule)) if client is not None and rule is not None else None
        with _LOCK:
            _check_fork()
            self._bind()
            _state.values.add(self)

    def _bind(self) -> None:
        """Attach to this process's file for the prefix, reading the stored value
        (a series seen before, e.g. a rule pushed again, continues from there)."""
        f = _file_for(self._prefix)
        self._file = f
        self._value, self._timestamp = f.data.read_value(self._key)
        f.owned.add(self._key)
        f.live.add(self)
        f.retired.discard(self._key)  # pushed again before the rewrite: in use again
        if self._rule is not None:
            _state.by_rule.setdefault(self._rule, set()).add((self._prefix, self._key))

    def inc(self, amount: float) -> None:
        with _LOCK:
            _check_fork()
            self._value += amount
            self._timestamp = 0.0
            self._file.data.write_value(self._key, self._value, self._timestamp)

    def set(self, value: float, timestamp: float | None = None) -> None:
        with _LOCK:
            _check_fork()
            self._value = value
            self._timestamp = timestamp or 0.0
            self._file.data.write_value(self._key, self._value, self._timestamp)

    def set_exemplar(self, exemplar: Any) -> None:
        return  # not kept in multiprocess mode (as prometheus_client's own value)

    def get(self) -> float:
        with _LOCK:
            _check_fork()
            return float(self._value)

    def get_exemplar(self) -> None:
        return None


def install() -> None:
    """Make every metric created from now on in this process (and in the children
    it forks) a ``CompactingValue``.  Call after exporting PROMETHEUS_MULTIPROC_DIR
    and before the first metric is created."""
    values.ValueClass = CompactingValue


def installed() -> bool:
    return values.ValueClass is CompactingValue


def retire_rule(client: str, rule: str) -> None:
    """Every series labelled with this ``client`` and ``rule`` is dead from now on
    (the rule is gone from this process), whoever still holds its values."""
    with _LOCK:
        _check_fork()
        for prefix, key in _state.by_rule.pop((client, rule), ()):
            f = _state.files.get(prefix)
            if f is not None:
                f.retired.add(key)


def maybe_compact(now: float | None = None, min_dead: int = MIN_DEAD) -> int:
    """Rewrite this process's files that carry many dead series; returns how many
    series were dropped.  Cheap when there is nothing to do: callers may call it
    on every removal, the rate bound is here."""
    if not installed():
        return 0
    now = time.monotonic() if now is None else now
    with _LOCK:
        _check_fork()
        if now - _state.last_compaction < MIN_INTERVAL_SECS:
            return 0
        due = [
            f for f in _state.files.values() if f.dead_estimate() >= max(min_dead, len(f.live) // 2)
        ]
        if not due:
            return 0
        _state.last_compaction = now
        return sum(_rewrite(f, min_dead) for f in due)


def _publish(path: str, entries: list[tuple[str, float, float]]) -> MmapedDict:
    """A new ``path`` holding ``entries``, written under a temporary name and
    renamed into place: a reader never finds it empty or half-written (a file
    created in place is 0 bytes long until it is sized, and the collectors fail
    on it)."""
    tmp = path + _TMP_SUFFIX
    try:
        os.unlink(tmp)  # a leftover of a rewrite that died half-way
    except FileNotFoundError:
        pass
    fresh = MmapedDict(tmp)
    try:
        for key, value, timestamp in entries:
            fresh.write_value(key, value, timestamp)
        os.replace(tmp, path)
    except BaseException:
        fresh.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return fresh


def _rewrite(f: _File, min_dead: int) -> int:
    """Replace ``f`` by a copy without its dead keys (``_LOCK`` held)."""
    live_keys = {v._key for v in list(f.live)}
    dead = (f.owned - live_keys) | f.retired
    if len(dead) < max(min_dead, len(live_keys) // 2):
        return 0  # several live values share keys: fewer dead than estimated
    kept = [(k, v, ts) for k, v, ts in f.data.read_all_values() if k not in dead]
    old, f.data = f.data, _publish(f.path, kept)
    old.close()
    _unindex(f, dead - f.retired)  # retired keys left the index with their rule
    f.owned = live_keys
    f.retired = set()
    return len(dead)


def _unindex(f: _File, keys: set[str]) -> None:
    """Take dropped keys of rules never retired (values that died) out of ``by_rule``."""
    prefix = os.path.basename(f.path).rsplit("_", 1)[0]
    for key in keys:
        try:
            labels = json.loads(key)[2]
            tag = (labels["client"], labels["rule"])
        except (ValueError, LookupError, TypeError):
            continue
        entries = _state.by_rule.get(tag)
        if entries is not None:
            entries.discard((prefix, key))
            if not entries:
                del _state.by_rule[tag]


def stats() -> dict[str, dict[str, int]]:
    """``{file prefix: {"owned", "live"}}`` of this process (for tests and debugging)."""
    with _LOCK:
        return {p: {"owned": len(f.owned), "live": len(f.live)} for p, f in _state.files.items()}
