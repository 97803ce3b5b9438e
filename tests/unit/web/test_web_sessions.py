"""Web UI sessions at the HTTP edge: the cookie, its flags, the CSRF verdict
handed to control, and that every route goes through a policy-checked RPC."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.routing import Route

from portunus.config import Settings
from portunus.control.policy import POLICY, PUBLIC
from portunus.errors import PortunusError
from portunus.web.app import create_app

from .fakes import AUTH, TOKEN, FakeControl

LOGIN = {"user_id": "alice", "password": "correct horse battery"}
ANSWER = {
    "user_id": "alice",
    "display_name": "Alice",
    "role": "user",
    "password_change_required": False,
    "session_token": "sess-0123456789",
    "max_age_secs": 604800,
}


async def test_login_sets_a_strict_httponly_cookie(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["auth.login"] = ANSWER
    r = await api.post("/v1/auth/login", json=LOGIN)
    assert r.status_code == 200
    assert r.json() == {
        "user_id": "alice",
        "display_name": "Alice",
        "role": "user",
        "password_change_required": False,
    }
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("portunus_session=sess-0123456789;")
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert flag in cookie.split("; ")
    assert "Secure" not in cookie  # plain http
    sent = fake.calls("auth.login")[0]
    assert sent["params"]["source"] == "127.0.0.1" and sent["token"] is None


async def test_cookie_is_secure_over_https(fake: FakeControl, settings: Settings) -> None:
    fake.replies["auth.login"] = ANSWER
    app = create_app(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://ui"
    ) as client:
        r = await client.post("/v1/auth/login", json=LOGIN)
    assert "Secure" in r.headers["set-cookie"].split("; ")


async def test_rate_limited_login_has_retry_after(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["auth.login"] = PortunusError(
        "rate_limited", "too many failed logins", retry_after=60
    )
    r = await api.post("/v1/auth/login", json=LOGIN)
    assert (r.status_code, r.headers["retry-after"], r.json()["error"]["code"]) == (
        429,
        "60",
        "rate_limited",
    )
    fake.replies["auth.login"] = PortunusError("invalid_login", "wrong user id or password")
    r = await api.post("/v1/auth/login", json=LOGIN)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_login")
    assert "set-cookie" not in r.headers


@pytest.mark.parametrize(
    ("headers", "csrf"),
    [
        ({}, False),
        ({"X-Portunus-CSRF": "1"}, True),
        ({"X-Portunus-CSRF": "yes"}, False),
        ({"X-Portunus-CSRF": "1", "Origin": "http://api"}, True),
        ({"X-Portunus-CSRF": "1", "Origin": "http://evil.example"}, False),
        ({"X-Portunus-CSRF": "1", "Origin": "null"}, False),
    ],
)
async def test_cookie_requests_carry_the_csrf_verdict(
    api: httpx.AsyncClient, fake: FakeControl, headers: dict[str, str], csrf: bool
) -> None:
    api.cookies.set("portunus_session", "sess-abc")
    r = await api.delete("/v1/rules/7", headers=headers)
    assert r.status_code == 204
    sent = fake.calls("rules.remove")[0]
    assert (sent["token"], sent["session"], sent["csrf"]) == (None, "sess-abc", csrf)


async def test_bearer_wins_over_cookie(api: httpx.AsyncClient, fake: FakeControl) -> None:
    api.cookies.set("portunus_session", "sess-abc")
    await api.get("/v1/rules", headers=AUTH)
    sent = fake.calls("rules.list")[0]
    assert sent["token"] == TOKEN and "session" not in sent


async def test_logout_clears_the_cookie(api: httpx.AsyncClient, fake: FakeControl) -> None:
    api.cookies.set("portunus_session", "sess-abc")
    r = await api.post("/v1/auth/logout", headers={"X-Portunus-CSRF": "1"})
    assert r.status_code == 204
    assert (
        r.headers["set-cookie"].startswith("portunus_session=;")
        and "Max-Age=0" in r.headers["set-cookie"]
    )
    assert fake.calls("auth.logout")[0]["session"] == "sess-abc"
    fake.replies["auth.logout"] = PortunusError(
        "unauthenticated", "the login session expired; log in again"
    )
    r = await api.post(
        "/v1/auth/logout", headers={"X-Portunus-CSRF": "1", "Cookie": "portunus_session=gone"}
    )
    assert r.status_code == 401 and "Max-Age=0" in r.headers["set-cookie"]


async def test_setup_creates_and_logs_in(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["auth.setup"] = {**ANSWER, "role": "superadmin"}
    r = await api.post(
        "/v1/auth/setup",
        json={"token": "t" * 43, "user_id": "root", "password": "correct horse battery"},
    )
    assert r.status_code == 201 and r.json()["role"] == "superadmin"
    assert "session_token" not in r.text and r.headers["set-cookie"].startswith("portunus_session=")


# One valid body per route that takes one; a new route must be added here.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/rules"): {"listen_port": 80, "targets": [{"host": "h", "port": 1}]},
    ("PUT", "/v1/rules/{id}"): {"rate_limit": None},
    ("POST", "/v1/client-enrollments"): {"name": "edge"},
    ("PATCH", "/v1/clients/{id}/name"): {"name": "edge"},
    ("POST", "/v1/auth/login"): LOGIN,
    ("POST", "/v1/auth/setup"): {
        "token": "t",
        "user_id": "root",
        "password": "correct horse battery",
    },
    ("POST", "/v1/users/me/password"): {"current_password": "x" * 12, "new_password": "y" * 12},
    ("POST", "/v1/users"): {"user_id": "bob"},
    ("POST", "/v1/users/{id}/password"): {},
    ("POST", "/v1/users/{id}/tokens"): {},
    ("POST", "/v1/grants"): {
        "user_id": "bob",
        "client": "*",
        "listen_port_start": 1,
        "listen_port_end": 2,
    },
    ("PUT", "/v1/clients/{id}/owners/{owner}/rate-limit"): {"bandwidth_in_bps": 1000},
}
NO_RPC = {("GET", "/v1/openapi.json")}


def _endpoints(settings: Settings) -> list[tuple[str, str]]:
    """Every API route. Web UI pages and static files (outside /v1) hold no data:
    they load it from /v1 in the browser, with the same cookie."""
    out = []
    for r in create_app(settings).routes:
        if not getattr(r, "path", "").startswith("/v1/"):
            continue
        assert isinstance(r, Route)
        if not r.path.startswith("/v1/"):  # pages: tests/unit/web/test_web_ui.py
            continue
        out += [(m, r.path) for m in sorted((r.methods or set()) - {"HEAD"})]
    assert len(out) >= 30
    return out


async def test_every_route_goes_through_a_policy_checked_rpc(
    api: httpx.AsyncClient, fake: FakeControl, settings: Settings
) -> None:
    fake.replies.update(
        {
            "auth.login": ANSWER,
            "auth.setup": ANSWER,
            "rules.push": {"id": 1},
            "rules.stats": {"id": 7},
        }
    )
    app = create_app(settings)
    app.state.stopping.set()  # the SSE stream ends after its first event
    api = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
    for method, path in _endpoints(settings):
        api.cookies.clear()
        url = path.replace("{id}", "7")
        before = len(fake.requests)
        if (method, path) in NO_RPC:
            continue
        r = await api.request(
            method,
            url,
            headers={**AUTH, "Accept": "application/json"},
            json=BODIES.get((method, path)),
            params={"interval": "0.2"},
        )
        assert r.status_code < 400 or r.status_code == 503, (method, path, r.text)
        called = [q["method"] for q in fake.requests[before:]]
        assert called, (method, path)
        for rpc in called:
            assert rpc in POLICY, (method, path, rpc)
        fake.requests.clear()
        api.cookies.clear()
        # No identity: refused here (401) unless the method is public.
        r = await api.request(method, url, json=BODIES.get((method, path)))
        if all(POLICY[rpc] == PUBLIC for rpc in called):
            assert r.status_code != 401, (method, path)
        else:
            assert r.status_code == 401, (method, path)
            assert fake.requests == []
        fake.requests.clear()
