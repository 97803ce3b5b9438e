"""The compacting multiprocess value store (portunus/metrics/store.py): dead series
leave the files, live ones keep their exact values, readers never see a torn file."""

from __future__ import annotations

import gc
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from portunus.metrics import store

FAR = 10_000.0  # a "now" past any rate bound


@pytest.fixture
def mp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test process in multiprocess mode with the compacting value class,
    restored afterwards (other tests create metrics in single-process mode)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(store, "_state", store._State())
    monkeypatch.setattr(values, "ValueClass", store.CompactingValue)
    yield tmp_path
    for f in store._state.files.values():
        f.data.close()


def _read(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What /metrics would show: the samples of every file in ``path``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in registry.collect()
        for s in fam.samples
    }


def _rules(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {dict(labels).get("rule", "") for _, labels in samples}


def _forget(metric: Counter | Gauge, *labels: str) -> None:
    """``remove`` as forget_rule does it (prometheus_client warns in multiprocess mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric.remove(*labels)


def _counter() -> Counter:
    return Counter("t_bytes_total", "bytes", ("rule",), registry=None)


def test_dead_series_leave_the_file_and_live_ones_keep_their_values(mp_dir: Path) -> None:
    c = _counter()
    c.labels("keep").inc(41)
    for i in range(3000):
        c.labels(str(i)).inc(i)
    before = _read(mp_dir)
    assert len(before) == 3001
    size_before = (mp_dir / f"counter_{os.getpid()}.db").stat().st_size
    for i in range(3000):
        _forget(c, str(i))
    gc.collect()
    assert store.maybe_compact(now=FAR) == 3000
    after = _read(mp_dir)
    assert after == {("t_bytes_total", (("rule", "keep"),)): 41.0}
    assert (mp_dir / f"counter_{os.getpid()}.db").stat().st_size < size_before
    assert not list(mp_dir.glob("*.compacting"))
    # The live child still writes to the (new) file and counts on from 41.
    c.labels("keep").inc(1)
    assert _read(mp_dir)[("t_bytes_total", (("rule", "keep"),))] == 42.0
    assert store.stats()["counter"] == {"owned": 1, "live": 1}


def test_nothing_is_rewritten_below_the_threshold_or_within_the_rate_bound(mp_dir: Path) -> None:
    c = _counter()
    for i in range(store.MIN_DEAD - 1):
        c.labels(str(i)).inc()
        _forget(c, str(i))
    assert store.maybe_compact(now=FAR) == 0  # too few dead series to be worth it
    c.labels("one-more").inc()
    _forget(c, "one-more")
    assert store.maybe_compact(now=FAR) == store.MIN_DEAD
    for i in range(store.MIN_DEAD):
        c.labels(f"b{i}").inc()
        _forget(c, f"b{i}")
    assert store.maybe_compact(now=FAR + store.MIN_INTERVAL_SECS / 2) == 0  # rate bound
    assert store.maybe_compact(now=FAR + store.MIN_INTERVAL_SECS) == store.MIN_DEAD


def test_few_live_among_many_dead_needs_dead_at_least_half_the_live(mp_dir: Path) -> None:
    c = _counter()
    for i in range(2000):
        c.labels(f"live{i}").inc()
    for i in range(store.MIN_DEAD * 2):
        c.labels(f"dead{i}").inc()
        _forget(c, f"dead{i}")
    assert store.maybe_compact(now=FAR) == 0  # 512 dead < 1000 (half the live)
    for i in range(600):
        c.labels(f"more{i}").inc()
        _forget(c, f"more{i}")
    assert store.maybe_compact(now=FAR) == 1112
    assert len(_read(mp_dir)) == 2000


def test_a_series_forgotten_then_recreated_before_the_rewrite_continues(mp_dir: Path) -> None:
    c = _counter()
    c.labels("again").inc(5)
    _forget(c, "again")
    c.labels("again").inc(1)  # a standalone rule pushed again under its name
    for i in range(store.MIN_DEAD):
        c.labels(str(i)).inc()
        _forget(c, str(i))
    store.maybe_compact(now=FAR)
    assert _read(mp_dir) == {("t_bytes_total", (("rule", "again"),)): 6.0}


def test_entries_this_process_did_not_write_are_kept(mp_dir: Path) -> None:
    """A file inherited through pid reuse keeps the dead process's counts: only
    series this process created and let go are dropped."""
    path = mp_dir / f"counter_{os.getpid()}.db"
    old = MmapedDict(str(path))
    foreign = '["t_bytes", "t_bytes_total", {"rule": "from-dead-pid"}, "bytes"]'
    old.write_value(foreign, 77.0, 0.0)
    old.close()
    c = _counter()
    for i in range(store.MIN_DEAD):
        c.labels(str(i)).inc()
        _forget(c, str(i))
    assert store.maybe_compact(now=FAR) == store.MIN_DEAD
    assert _read(mp_dir) == {("t_bytes_total", (("rule", "from-dead-pid"),)): 77.0}


def test_gauges_keep_their_mode_files_and_timestamps(mp_dir: Path) -> None:
    g = Gauge("t_state", "state", ("rule",), multiprocess_mode="livemostrecent", registry=None)
    g.labels("kept").set(1)
    for i in range(store.MIN_DEAD):
        g.labels(str(i)).set(1)
        _forget(g, str(i))
    ts_before = dict(
        (k, ts)
        for k, _, ts in MmapedDict(
            str(mp_dir / f"gauge_livemostrecent_{os.getpid()}.db")
        ).read_all_values()
    )
    assert store.maybe_compact(now=FAR) == store.MIN_DEAD
    entries = list(
        MmapedDict(str(mp_dir / f"gauge_livemostrecent_{os.getpid()}.db")).read_all_values()
    )
    assert [(v, ts) for _, v, ts in entries] == [(1.0, ts_before[entries[0][0]])]
    assert _read(mp_dir) == {("t_state", (("rule", "kept"),)): 1.0}


def test_a_concurrent_reader_sees_whole_files_and_monotonic_live_counters(
    mp_dir: Path,
) -> None:
    """The web process reads while a shard churns and rewrites: every read parses,
    and the live counter never goes backwards or vanishes."""
    c = _counter()
    live = c.labels("live")
    stop = threading.Event()
    seen: list[float] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(_read(mp_dir)[("t_bytes_total", (("rule", "live"),))])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    live.inc()
    t = threading.Thread(target=reader)
    t.start()
    rewrites = 0
    try:
        for round_ in range(20):
            for i in range(store.MIN_DEAD):
                c.labels(f"{round_}-{i}").inc()
                live.inc()
                _forget(c, f"{round_}-{i}")
            rewrites += store.maybe_compact(now=FAR + round_ * store.MIN_INTERVAL_SECS) > 0
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert rewrites == 20
    assert len(seen) > 5
    assert seen == sorted(seen)
    assert _read(mp_dir) == {("t_bytes_total", (("rule", "live"),)): 1.0 + 20 * store.MIN_DEAD}


def test_a_forked_child_writes_its_own_file(mp_dir: Path) -> None:
    c = _counter()
    c.labels("parent").inc(3)
    pid = os.fork()
    if pid == 0:  # the child: count, let go and compact in its own file only
        try:
            c.labels("parent").inc(1)
            for i in range(store.MIN_DEAD):
                c.labels(str(i)).inc()
                _forget(c, str(i))
            os._exit(0 if store.maybe_compact(now=FAR) == store.MIN_DEAD else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (mp_dir / f"counter_{pid}.db").exists()
    # Parent 3 + child 1 (the child started its own file from zero).
    assert _read(mp_dir) == {("t_bytes_total", (("rule", "parent"),)): 4.0}


def test_without_the_store_installed_compaction_does_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)
    assert store.maybe_compact(now=FAR) == 0


def _rule_counter() -> Counter:
    return Counter("t_rule_bytes_total", "bytes", ("client", "rule"), registry=None)


def test_a_retired_rule_is_dropped_even_while_something_still_holds_its_values(
    mp_dir: Path,
) -> None:
    """A drained rule's runtime may sit in a reference cycle until the garbage
    collector runs: retiring the rule does not wait for it."""
    c = _rule_counter()
    lingering = []
    for i in range(store.MIN_DEAD):
        child = c.labels("local", str(i))
        child.inc(2)
        lingering.append(child)  # e.g. a handler <-> connections cycle
        _forget(c, "local", str(i))
        store.retire_rule("local", str(i))
    kept = c.labels("local", "kept")
    kept.inc(9)
    assert store.maybe_compact(now=FAR) == store.MIN_DEAD
    assert _read(mp_dir) == {("t_rule_bytes_total", (("client", "local"), ("rule", "kept"))): 9.0}
    assert set(store._state.by_rule) == {("local", "kept")}
    # A late write to a retired series puts it back whole (never from zero).
    lingering[3].inc(1)
    assert _read(mp_dir)[("t_rule_bytes_total", (("client", "local"), ("rule", "3")))] == 3.0


def test_a_rule_pushed_again_before_the_rewrite_is_not_retired(mp_dir: Path) -> None:
    c = _rule_counter()
    c.labels("local", "web").inc(5)
    _forget(c, "local", "web")
    store.retire_rule("local", "web")
    c.labels("local", "web").inc(1)  # standalone: the same name pushed again
    for i in range(store.MIN_DEAD):
        c.labels("local", str(i)).inc()
        _forget(c, "local", str(i))
        store.retire_rule("local", str(i))
    store.maybe_compact(now=FAR)
    assert _read(mp_dir) == {("t_rule_bytes_total", (("client", "local"), ("rule", "web"))): 6.0}


def test_the_rule_index_forgets_values_that_died_without_a_retire(mp_dir: Path) -> None:
    c = _rule_counter()
    for i in range(store.MIN_DEAD):
        c.labels("local", str(i)).inc()
        _forget(c, "local", str(i))  # no retire_rule: the value just dies
    gc.collect()
    assert store.maybe_compact(now=FAR) == store.MIN_DEAD
    assert store._state.by_rule == {}


def test_retired_series_whose_values_also_died_are_not_counted_twice(mp_dir: Path) -> None:
    """Half a threshold of rules retired and let go must not look like a full one:
    a rewrite found not worth it would spend the rate bound for nothing."""
    c = _rule_counter()
    for i in range(store.MIN_DEAD // 2):
        c.labels("local", str(i)).inc()
        _forget(c, "local", str(i))
        store.retire_rule("local", str(i))
    assert store.maybe_compact(now=FAR) == 0
    for i in range(store.MIN_DEAD // 2, store.MIN_DEAD):
        c.labels("local", str(i)).inc()
        _forget(c, "local", str(i))
        store.retire_rule("local", str(i))
    assert store.maybe_compact(now=FAR + 1) == store.MIN_DEAD  # not held back by the bound


def test_a_new_file_appears_whole(mp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .db file created in place is 0 bytes long until MmapedDict sizes it, and a
    reader (control's rule_totals, /metrics) that opens it then fails: new files are
    built under a temporary name and renamed into place."""
    created_in_place: list[str] = []
    real = store.MmapedDict

    def watching(path: str, *args: object, **kwargs: object) -> MmapedDict:
        if path.endswith(".db") and not os.path.exists(path):
            created_in_place.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store, "MmapedDict", watching)
    _counter().labels("a").inc()
    Gauge("t_g", "g", ("rule",), multiprocess_mode="livesum", registry=None).labels("a").set(1)
    assert created_in_place == []
    assert sorted(p.name for p in mp_dir.iterdir()) == [
        f"counter_{os.getpid()}.db",
        f"gauge_livesum_{os.getpid()}.db",
    ]
    assert _read(mp_dir)[("t_g", (("rule", "a"),))] == 1.0
