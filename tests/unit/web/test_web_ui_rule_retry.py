"""The "Retry" button of a failed rule on its detail page: shown only for a failed
rule, a CSRF-checked form post that is ``rules.retry``, and the still-failed answer
shown on the page with its code."""

from __future__ import annotations

import httpx
import pytest

from portunus.errors import PortunusError

from .fakes import AUTH, RULE, STATS, FakeControl

POST = {
    **AUTH,
    "X-Portunus-CSRF": "1",
    "Origin": "http://api",
    "Content-Type": "application/x-www-form-urlencoded",
}
FAILED = {**RULE, "state": "failed", "failure_reason": "port_in_use (port 8080 already bound)"}
BUTTON = 'action="/rules/7/retry"'


@pytest.fixture(autouse=True)
def replies(fake: FakeControl) -> None:
    fake.replies.update(
        {
            "users.me": {
                "user_id": "operator",
                "display_name": "Operator",
                "role": "superadmin",
                "password_change_required": False,
            },
            "rules.get": FAILED,
            "rules.stats": {**STATS, "per_port": [], "per_target": []},
            "traffic.query": {"resolution": "minute", "from": 0, "to": 60, "series": []},
        }
    )


async def test_retry_button_only_on_a_failed_rule(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    r = await api.get("/rules/7", headers=AUTH)
    assert r.status_code == 200 and BUTTON in r.text
    fake.replies["rules.get"] = RULE  # active
    r = await api.get("/rules/7", headers=AUTH)
    assert r.status_code == 200 and BUTTON not in r.text


async def test_retry_form_calls_rules_retry_and_redirects(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["rules.retry"] = RULE
    r = await api.post("/rules/7/retry", content="", headers=POST)
    assert r.status_code == 303 and r.headers["location"] == "/rules/7?notice=retried"
    assert fake.calls("rules.retry")[0]["params"] == {"id": 7}
    fake.replies["rules.get"] = RULE
    r = await api.get("/rules/7?notice=retried", headers=AUTH)
    assert "Retried; the client answered <strong>active</strong>" in r.text


async def test_retry_form_needs_the_csrf_header(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["rules.retry"] = RULE
    headers = {k: v for k, v in POST.items() if k != "X-Portunus-CSRF"}
    r = await api.post("/rules/7/retry", content="", headers=headers)
    assert r.status_code == 403 and "csrf_failed" in r.text
    r = await api.post(
        "/rules/7/retry", content="", headers={**POST, "Origin": "http://evil.example"}
    )
    assert r.status_code == 403 and "csrf_failed" in r.text
    assert not fake.calls("rules.retry")


async def test_still_failed_retry_shows_the_code_on_the_page(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["rules.retry"] = PortunusError(
        "activation_failed", "port_in_use (port 8080 already bound)", rule=FAILED
    )
    r = await api.post("/rules/7/retry", content="", headers=POST)
    assert r.status_code == 422
    assert "Retry refused" in r.text and "activation_failed" in r.text
    assert BUTTON in r.text  # still failed: the button stays for the next try


async def test_retry_of_a_missing_rule_is_the_error_page(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["rules.retry"] = PortunusError("rule_not_found", "no rule 7")
    r = await api.post("/rules/7/retry", content="", headers=POST)
    assert r.status_code == 404 and "rule_not_found" in r.text
