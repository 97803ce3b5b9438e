"""push-rule and the other verbs refuse non-finite and out-of-range numbers with
exit 2 and the option named, before anything is sent to control."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "value", ["inf", "-inf", "nan", "NaN", "1e400", "0", "0.05", "3601", "abc"]
)
def test_push_rule_refuses_bad_health_check_interval(control, run, value: str) -> None:
    res = run(
        "push-rule", "local", "18080", "127.0.0.1:8080", "--health-check-interval-secs", value
    )
    assert res.exit_code == 2, res.output
    assert "--health-check-interval-secs" in res.stderr
    assert "[0.1, 3600]" in res.stderr
    assert control.requests == []


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--ack-timeout", "inf"),
        ("--ack-timeout", "nan"),
        ("--ack-timeout", "0"),
        ("--ack-timeout", "301"),
        ("--bandwidth-in-bps", "0"),
        ("--bandwidth-in-bps", "1000000000001"),
        ("--bandwidth-in-bps", "9" * 5000),
    ],
)
def test_push_rule_refuses_other_bad_numbers(control, run, option: str, value: str) -> None:
    res = run("push-rule", "local", "18080", "127.0.0.1:8080", option, value)
    assert res.exit_code == 2, res.output
    assert option in res.stderr
    assert control.requests == []


def test_push_rule_refuses_a_huge_priority_and_port(control, run) -> None:
    res = run("push-rule", "local", "18080", "--target", "127.0.0.1:8080@" + "9" * 5000)
    assert res.exit_code == 2, res.output
    res = run("push-rule", "local", "1" + "0" * 5000, "127.0.0.1:8080")
    assert res.exit_code == 2, res.output
    assert control.requests == []


@pytest.mark.parametrize(
    "args",
    [
        ("remove-rule", "9" * 30),
        ("remove-rule", "nan"),
        ("audit", "--limit", "inf"),
    ],
)
def test_other_verbs_refuse_out_of_range_numbers(control, run, args: tuple[str, ...]) -> None:
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert control.requests == []
