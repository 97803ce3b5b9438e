"""Hostile HTTP bodies: 400 with the field or reason named, never a 5xx, and
nothing forwarded to control for a body that fails validation."""

from __future__ import annotations

import httpx
import pytest

from .fakes import AUTH, RULE, FakeControl

GOOD = '{"listen_port": 8080, "targets": [{"host": "127.0.0.1", "port": 9090}]%s}'


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (', "health_check_interval_secs": 1e400', "out of range"),
        (', "health_check_interval_secs": -1e400', "out of range"),
        (', "health_check_interval_secs": Infinity', "Infinity is not valid JSON"),
        (', "health_check_interval_secs": NaN', "NaN is not valid JSON"),
        (', "rate_limit": {"bandwidth_in_bps": 1e400}', "out of range"),
        (', "rate_limit": {"bandwidth_in_bps": ' + "9" * 5000 + "}", "4300 digits"),
    ],
)
async def test_non_finite_numbers_are_400_and_never_reach_control(
    api: httpx.AsyncClient, fake: FakeControl, extra: str, words: str
) -> None:
    fake.replies["rules.push"] = RULE
    r = await api.post(
        "/v1/rules", content=GOOD % extra, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "validation.json"
    assert words in err["message"]
    assert fake.calls("rules.push") == []


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (', "health_check_interval_secs": 3601', "health_check_interval_secs"),
        (', "health_check_interval_secs": 0.01', "health_check_interval_secs"),
        (', "rate_limit": {"bandwidth_in_bps": 1000000000001}', "rate_limit.bandwidth_in_bps"),
        (', "client": "' + "c" * 129 + '"', "client"),
    ],
)
async def test_out_of_range_numbers_and_strings_name_the_field(
    api: httpx.AsyncClient, fake: FakeControl, extra: str, field: str
) -> None:
    r = await api.post(
        "/v1/rules", content=GOOD % extra, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field
    assert fake.calls("rules.push") == []


@pytest.mark.parametrize(
    "body",
    [
        # Under the 64 KiB body limit (web.limits), so the depth check answers.
        "[" * 30_000 + "]" * 30_000,
        "[" * 60_000,
        '{"a":' * 10_000 + "1" + "}" * 10_000,
        '{"listen_port": 8080, "targets": ' + "[" * 33 + "]" * 33 + "}",
    ],
)
async def test_deeply_nested_bodies_are_400(
    api: httpx.AsyncClient, fake: FakeControl, body: str
) -> None:
    for path, method in (
        ("/v1/rules", "POST"),
        ("/v1/rules/7", "PUT"),
        ("/v1/client-enrollments", "POST"),
    ):
        r = await api.request(
            method, path, content=body, headers={**AUTH, "Content-Type": "application/json"}
        )
        assert r.status_code == 400, (path, r.text[:300])
        assert r.json()["error"]["code"] == "validation.json"
        assert "nested deeper than 32 levels" in r.json()["error"]["message"]
    assert [r["method"] for r in fake.requests if r["method"] != "health"] == []


async def test_the_issue_200_kb_nesting_is_refused_by_size(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    """The issue's ~200 KB of ``[[[…`` no longer reaches the parser at all."""
    body = "[" * 100_000 + "]" * 100_000
    r = await api.post(
        "/v1/rules", content=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "validation.body_too_large"
    assert fake.calls("rules.push") == []


async def test_thousands_of_unknown_keys_give_a_bounded_answer(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    # 300 keys of ~200 bytes: under the 64 KiB body limit, far over MAX_PROBLEMS.
    body = "{" + ",".join(f'"{"k" * 200}{i}": 1' for i in range(300)) + "}"
    r = await api.post(
        "/v1/rules", content=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert len(r.content) < 40_000  # 50 problems of at most ~400 bytes; unbounded it is ~130 KB
    assert len(r.json()["error"]["errors"]) <= 50


async def test_empty_audit_filters_reach_control(api: httpx.AsyncClient, fake: FakeControl) -> None:
    """``?until=`` is a filter the caller gave: it must be refused, not ignored."""
    fake.replies["audit.list"] = {"entries": [], "next_cursor": None}
    await api.get("/v1/audit?until=&since=", headers=AUTH)
    assert fake.calls("audit.list")[-1]["params"] == {"until": "", "since": ""}
