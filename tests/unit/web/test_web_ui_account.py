"""Web UI sign-in, first-run setup, forced password change, and the superadmin's
users/grants/tokens pages, against a fake control socket."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from portunus.errors import PortunusError
from portunus.web.ui.account import safe_next

from .fakes import AUTH, FakeControl

FORM = {
    "Content-Type": "application/x-www-form-urlencoded",
    "X-Portunus-CSRF": "1",
    "Origin": "http://api",
}
SESSION = {
    "user_id": "alice",
    "display_name": "Alice",
    "role": "user",
    "password_change_required": False,
    "session_token": "sess-SECRET-value",
    "idle_timeout_secs": 28800,
    "max_age_secs": 604800,
}


def me(user: str, role: str, change: bool = False) -> dict[str, Any]:
    return {"user_id": user, "display_name": user, "role": role, "password_change_required": change}


@pytest.fixture(autouse=True)
def replies(fake: FakeControl) -> None:
    fake.replies.update(
        {
            "users.me": me("operator", "superadmin"),
            "clients.list": {"clients": [], "next_cursor": None, "total": 0},
            "rules.list": {"rules": []},
            "traffic.summary": {
                "bytes_in_per_sec": 0,
                "bytes_out_per_sec": 0,
                "per_rule": {},
                "top_rules": [],
            },
            "traffic.query": {"resolution": "minute", "from": 0, "to": 60, "series": []},
        }
    )


def test_next_is_always_a_local_path() -> None:
    assert safe_next("/rules?state=failed") == "/rules?state=failed"
    for bad in (
        None,
        "",
        "//evil.example/x",
        "https://evil.example",
        "\\\\evil",
        "rules",
        "/\\evil",
    ):
        assert safe_next(bad) == "/"


async def test_login_sets_the_session_cookie_and_redirects(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["auth.login"] = SESSION
    r = await api.post(
        "/login",
        content=urlencode(
            {"user_id": "alice", "password": "correct horse battery", "next": "/rules"}
        ),
        headers=FORM,
    )
    assert r.status_code == 303 and r.headers["location"] == "/rules"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("portunus_session=sess-SECRET-value;")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "sess-SECRET-value" not in r.text
    [req] = fake.calls("auth.login")
    assert req["params"]["user_id"] == "alice" and req["params"]["source"]


async def test_login_errors_are_shown_on_the_form(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["auth.login"] = PortunusError("invalid_login", "wrong user id or password")
    r = await api.post(
        "/login", content=urlencode({"user_id": "alice", "password": "x" * 12}), headers=FORM
    )
    assert r.status_code == 401 and "invalid_login" in r.text and "set-cookie" not in r.headers
    assert 'value="alice"' in r.text and "x" * 12 not in r.text  # the password is never echoed
    fake.replies["auth.login"] = PortunusError(
        "rate_limited", "too many failed logins", retry_after=60
    )
    r = await api.post(
        "/login", content=urlencode({"user_id": "alice", "password": "x" * 12}), headers=FORM
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "60"


async def test_login_post_needs_the_csrf_header(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["auth.login"] = SESSION
    headers = {k: v for k, v in FORM.items() if k != "X-Portunus-CSRF"}
    r = await api.post(
        "/login", content=urlencode({"user_id": "alice", "password": "p" * 12}), headers=headers
    )
    assert r.status_code == 403 and "csrf_failed" in r.text
    assert not fake.calls("auth.login")


async def test_forced_password_change_redirects_every_page(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["auth.login"] = {**SESSION, "password_change_required": True}
    r = await api.post(
        "/login", content=urlencode({"user_id": "alice", "password": "p" * 12}), headers=FORM
    )
    assert r.headers["location"] == "/account/password"
    fake.replies["users.me"] = me("alice", "user", change=True)
    for path in ("/", "/rules", "/clients"):
        r = await api.get(path, headers=AUTH)
        assert r.status_code == 303 and r.headers["location"] == "/account/password", path
    assert (await api.get("/account/password", headers=AUTH)).status_code == 200
    fake.replies["users.me.password"] = {}
    body = urlencode({"current_password": "p" * 12, "new_password": "n" * 12, "confirm": "n" * 12})
    r = await api.post("/account/password", content=body, headers={**FORM, **AUTH})
    assert r.status_code == 303
    assert fake.calls("users.me.password")[0]["params"] == {
        "current_password": "p" * 12,
        "new_password": "n" * 12,
    }
    mismatch = urlencode(
        {"current_password": "p" * 12, "new_password": "n" * 12, "confirm": "m" * 12}
    )
    r = await api.post("/account/password", content=mismatch, headers={**FORM, **AUTH})
    assert r.status_code == 400 and "validation.password_mismatch" in r.text


async def test_setup_page_creates_the_first_superadmin(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    r = await api.get("/setup?token=TOK123")
    assert r.status_code == 200 and 'name="token" value="TOK123"' in r.text
    fake.replies["auth.setup"] = {**SESSION, "user_id": "admin", "role": "superadmin"}
    body = urlencode(
        {"token": "TOK123", "user_id": "admin", "password": "s" * 14, "confirm": "s" * 14}
    )
    r = await api.post("/setup", content=body, headers=FORM)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert r.headers["set-cookie"].startswith("portunus_session=")
    assert fake.calls("auth.setup")[0]["params"]["token"] == "TOK123"
    fake.replies["auth.setup"] = PortunusError(
        "invalid_setup_token", "the setup token is not valid"
    )
    r = await api.post("/setup", content=body, headers=FORM)
    assert "invalid_setup_token" in r.text and "set-cookie" not in r.headers


async def test_logout_clears_the_cookie(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["auth.logout"] = {}
    r = await api.post("/logout", content="", headers={**FORM, **AUTH})
    assert r.status_code == 303 and r.headers["location"] == "/login?notice=signed-out"
    assert "Max-Age=0" in r.headers["set-cookie"]
    assert fake.calls("auth.logout")


async def test_create_user_shows_the_temporary_password_once(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["users.add"] = {
        **me("bob", "user", change=True),
        "temporary_password": "TEMP-pass-123456",
    }
    r = await api.post(
        "/users/new",
        content=urlencode({"user_id": "bob", "role": "user"}),
        headers={**FORM, **AUTH},
    )
    assert (
        r.status_code == 201
        and "TEMP-pass-123456" in r.text
        and 'data-copy="temp-password"' in r.text
    )
    assert r.headers["cache-control"] == "no-store"
    assert fake.calls("users.add")[0]["params"] == {"user_id": "bob", "role": "user"}
    fake.replies["users.add"] = PortunusError(
        "user_exists", "user bob exists already", user_id="bob"
    )
    r = await api.post(
        "/users/new", content=urlencode({"user_id": "bob"}), headers={**FORM, **AUTH}
    )
    assert r.status_code == 409 and "user_exists" in r.text


async def test_user_page_grants_and_tokens(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies.update(
        {
            "users.get": me("bob", "user"),
            "grants.list": {
                "grants": [
                    {
                        "grant_id": 4,
                        "user_id": "bob",
                        "client": "*",
                        "client_id": "*",
                        "listen_port_start": 30000,
                        "listen_port_end": 30099,
                        "protocols": ["tcp"],
                        "note": None,
                    }
                ]
            },
            "tokens.list": {
                "tokens": [
                    {
                        "token_id": 9,
                        "user_id": "bob",
                        "name": "ci",
                        "created_at": "x",
                        "last_used_at": None,
                        "revoked_at": None,
                    }
                ]
            },
            "grants.add": {"grant_id": 5},
            "tokens.issue": {"token_id": 10, "token": "NEW-TOKEN-VALUE", "name": "ci2"},
        }
    )
    r = await api.get("/users/bob", headers=AUTH)
    assert r.status_code == 200 and "30000-30099" in r.text and "ci" in r.text
    r = await api.post(
        "/users/bob/grants",
        content=urlencode({"client": "*", "ports": "31000-31009", "protocols": "tcp,udp"}),
        headers={**FORM, **AUTH},
    )
    assert r.status_code == 303
    assert fake.calls("grants.add")[0]["params"] == {
        "user_id": "bob",
        "client": "*",
        "listen_port_start": 31000,
        "listen_port_end": 31009,
        "protocols": ["tcp", "udp"],
    }
    r = await api.post(
        "/users/bob/tokens", content=urlencode({"name": "ci2"}), headers={**FORM, **AUTH}
    )
    assert (
        r.status_code == 201 and "NEW-TOKEN-VALUE" in r.text and 'data-copy="new-token"' in r.text
    )
    assert "NEW-TOKEN-VALUE" not in (await api.get("/users/bob", headers=AUTH)).text


async def test_remove_user_previews_the_cascade(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies.update(
        {
            "users.get": me("bob", "user"),
            "rules.list": {"rules": [{"id": 12}, {"id": 13}]},
            "grants.list": {
                "grants": [
                    {"grant_id": 4, "client": "*", "listen_port_start": 1, "listen_port_end": 9}
                ]
            },
            "tokens.list": {
                "tokens": [
                    {"token_id": 9, "name": "ci", "revoked_at": None},
                    {"token_id": 8, "name": "old", "revoked_at": "2026-01-01"},
                ]
            },
            "users.remove": {
                "user_id": "bob",
                "removed_rule_ids": [12, 13],
                "revoked_grant_ids": [4],
                "revoked_token_ids": [9],
            },
        }
    )
    r = await api.get("/users/bob/remove", headers=AUTH)
    assert r.status_code == 200
    assert (
        "2 rules" in r.text
        and 'href="/rules/12"' in r.text
        and "1 grant" in r.text
        and "1 API token" in r.text
    )
    assert fake.calls("rules.list")[-1]["params"] == {"owner": "bob", "limit": 1000}
    assert not fake.calls("users.remove")
    r = await api.post("/users/bob/remove", content="", headers={**FORM, **AUTH})
    assert r.status_code == 200 and "12, 13" in r.text
    assert fake.calls("users.remove")[0]["params"] == {"user_id": "bob"}


async def test_users_pages_are_superadmin_only(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["users.me"] = me("alice", "user")
    for path in ("/users", "/users/new", "/users/bob", "/users/bob/remove"):
        r = await api.get(path, headers=AUTH)
        assert r.status_code == 403 and "Not permitted" in r.text, path
    assert not fake.calls("users.list") and not fake.calls("users.get")


async def test_grant_revoke_previews_the_rules_at_risk(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    grant = {
        "grant_id": 4,
        "user_id": "bob",
        "client": "*",
        "client_id": "*",
        "listen_port_start": 30000,
        "listen_port_end": 30099,
        "protocols": ["tcp"],
        "note": None,
    }
    inside = {
        "id": 12,
        "client": "local",
        "client_id": "local",
        "protocol": "tcp",
        "listen_port": 30005,
    }
    outside = {
        "id": 13,
        "client": "local",
        "client_id": "local",
        "protocol": "tcp",
        "listen_port": 31000,
    }
    fake.replies.update(
        {
            "grants.list": {"grants": [grant]},
            "rules.list": {"rules": [inside, outside]},
            "grants.revoke": {"grant_id": 4, "removed_rule_ids": [12]},
        }
    )
    r = await api.get("/users/bob/grants/4/revoke", headers=AUTH)
    assert (
        r.status_code == 200 and 'href="/rules/12"' in r.text and 'href="/rules/13"' not in r.text
    )
    assert not fake.calls("grants.revoke")
    assert (await api.get("/users/bob/grants/9/revoke", headers=AUTH)).status_code == 404
    r = await api.post("/users/bob/grants/4/revoke", content="", headers={**FORM, **AUTH})
    assert (
        r.status_code == 303
        and r.headers["location"] == "/users/bob?notice=grant-revoked&removed=12"
    )
    assert fake.calls("grants.revoke")[0]["params"] == {"grant_id": 4}


OWNERS = {
    "client_id": "local",
    "client": "local",
    "owners": [
        {
            "owner": "alice",
            "rule_count": 2,
            "rate_limit": {"bandwidth_in_bps": 1000},
            "updated_at": "2026-12-05T10:00:00Z",
        },
        {"owner": "bob", "rule_count": 1, "rate_limit": None, "updated_at": None},
    ],
}


async def test_owner_caps_page_lists_and_sets(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies.update(
        {
            "clients.list": {
                "clients": [{"client_id": "local", "client_name": "local"}],
                "next_cursor": None,
                "total": 1,
            },
            "owner_caps.list": OWNERS,
            "owner_caps.get": {"owner": "alice", "rate_limit": {"bandwidth_in_bps": 1000}},
            "owner_caps.set": {"owner": "bob"},
            "owner_caps.delete": {},
        }
    )
    r = await api.get("/owner-caps?client=local&owner=alice", headers=AUTH)
    assert r.status_code == 200 and "bandwidth_in_bps=1000" in r.text and 'value="1000"' in r.text
    assert fake.calls("owner_caps.list")[0]["params"] == {"client": "local"}
    body = urlencode({"client": "local", "owner": "bob", "rate_limit.concurrent_connections": "5"})
    r = await api.post("/owner-caps/set", content=body, headers={**FORM, **AUTH})
    assert r.status_code == 303 and r.headers["location"] == "/owner-caps?client=local&notice=set"
    assert fake.calls("owner_caps.set")[0]["params"] == {
        "client": "local",
        "owner": "bob",
        "rate_limit": {"concurrent_connections": 5},
    }
    bad = urlencode({"client": "local", "owner": "bob", "rate_limit.concurrent_connections": "0"})
    r = await api.post("/owner-caps/set", content=bad, headers={**FORM, **AUTH})
    assert (
        r.status_code == 400
        and "validation.rate_limit" in r.text
        and 'aria-invalid="true"' in r.text
    )
    fake.replies["owner_caps.set"] = PortunusError("preflight", "give at least one cap")
    r = await api.post(
        "/owner-caps/set",
        content=urlencode({"client": "local", "owner": "bob"}),
        headers={**FORM, **AUTH},
    )
    assert r.status_code == 400 and "preflight" in r.text
    r = await api.post(
        "/owner-caps/delete",
        content=urlencode({"client": "local", "owner": "alice"}),
        headers={**FORM, **AUTH},
    )
    assert r.status_code == 303 and fake.calls("owner_caps.delete")[0]["params"] == {
        "client": "local",
        "owner": "alice",
    }
    fake.replies["users.me"] = me("alice", "user")
    assert (await api.get("/owner-caps", headers=AUTH)).status_code == 403


async def test_users_page_pages_by_cursor_with_filters(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    row = {
        "user_id": "alice",
        "display_name": "Alice",
        "role": "user",
        "password_change_required": False,
        "has_password": True,
        "builtin": False,
        "created_at": "2026-01-01T00:00:00Z",
    }
    fake.replies["users.list"] = {"users": [row], "next_cursor": "u/2", "total": 250}
    r = await api.get("/users?role=user&name_prefix=al", headers=AUTH)
    assert r.status_code == 200 and "250 users match the filters" in r.text
    assert fake.calls("users.list")[-1]["params"] == {
        "role": "user",
        "name_prefix": "al",
        "limit": 100,
    }
    assert 'href="/users?role=user&amp;name_prefix=al&amp;cursor=u/2">Next page' in r.text
    fake.replies["users.list"] = {"users": [row], "next_cursor": None, "total": 250}
    r = await api.get("/users?role=user&name_prefix=al&cursor=u/2", headers=AUTH)
    assert fake.calls("users.list")[-1]["params"]["cursor"] == "u/2"
    assert "Next page" not in r.text and "← First page" in r.text
