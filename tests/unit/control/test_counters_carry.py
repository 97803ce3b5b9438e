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


def _exposed(text: bytes, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_metrics_add_carried_totals_and_edge_rules(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from portunus.web.metrics import render_metrics

    monkeypatch.setenv("PORTUNUS_RUN_ID", "run-new")
    row = {
        "client": "local",
        "owner": "",
        "bytes_in": 10,
        "bytes_out": 20,
        "connections_total": 3,
        "known": {"bytes_in": 15, "bytes_out": 25, "connections_total": 4},
    }
    edge = {
        "client": "edge-1",
        "owner": "",
        "bytes_in": 7,
        "bytes_out": 8,
        "connections_total": 2,
        "active_connections": 1,
    }
    fresh = render_metrics(
        str(tmp_path), None, None, {"run": "run-new", "local": {"5": row}, "remote": {"9": edge}}
    )
    assert _exposed(fresh, "portunus_rule_bytes_in_total", rule="5", client="local") == 10
    assert _exposed(fresh, "portunus_rule_connections_total", rule="9", client="edge-1") == 2
    assert _exposed(fresh, "portunus_rule_active_connections", rule="9", client="edge-1") == 1
    # A file left by the previous run: its final totals are the base (never backwards).
    stale = render_metrics(
        str(tmp_path), None, None, {"run": "run-old", "local": {"5": row}, "remote": {}}
    )
    assert _exposed(stale, "portunus_rule_bytes_in_total", rule="5", client="local") == 15
    assert _exposed(stale, "portunus_rule_connections_total", rule="5", client="local") == 4
