"""Carried rule counters (control/counters.py): totals across restarts of the
process that counts never go backwards, and a control restart within one run
never counts twice."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from portunus.control.counters import COUNTED, Carry


def live(n: int) -> dict[str, int]:
    return dict.fromkeys(COUNTED, n)


def test_same_run_reports_replace_the_last_value() -> None:
    c = Carry()
    assert c.advance(live(5), "run-a")
    assert c.total(live(7), "run-a") == live(7)
    assert not c.advance(live(5), "run-a")  # nothing new: nothing to write


def test_a_new_run_banks_the_previous_runs_count() -> None:
    c = Carry()
    c.advance(live(100), "run-a")
    assert c.base("run-b") == live(100)  # before the new run reported anything
    assert c.total(live(3), "run-b") == live(103)
    c.advance(live(3), "run-b")
    assert c.carried == live(100) and c.total(live(10), "run-b") == live(110)


def test_a_count_that_shrinks_within_a_run_is_banked_too() -> None:
    c = Carry()
    c.advance(live(50), None)  # a client that sends no run id
    c.advance(live(2), None)
    assert c.known() == live(52)


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 10)), min_size=1, max_size=30
    )
)
def test_totals_never_go_backwards(steps: list[tuple[str, int]]) -> None:
    c = Carry()
    counts: dict[str, int] = {}
    previous = 0
    for run, add in steps:
        if run != c.run:
            counts[run] = 0  # a new run starts counting from zero
        counts[run] = counts.get(run, 0) + add
        c.advance(live(counts[run]), run)
        now = c.known()["bytes_in"]
        assert now >= previous
        previous = now
