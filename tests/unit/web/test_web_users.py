"""/v1/users, /v1/tokens and /v1/grants at the HTTP edge: statuses, the RPC each
route sends, and bodies refused before control is asked."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .fakes import AUTH, FakeControl


@pytest.mark.parametrize(
    ("method", "path", "body", "rpc", "params", "status"),
    [
        (
            "POST",
            "/v1/users",
            {"user_id": "bob", "role": "user"},
            "users.add",
            {"user_id": "bob", "role": "user"},
            201,
        ),
        ("GET", "/v1/users", None, "users.list", {}, 200),
        ("GET", "/v1/users/bob", None, "users.get", {"user_id": "bob"}, 200),
        ("DELETE", "/v1/users/bob", None, "users.remove", {"user_id": "bob"}, 200),
        (
            "POST",
            "/v1/users/bob/password",
            {"password": "x" * 12},
            "users.passwd",
            {"user_id": "bob", "password": "x" * 12},
            200,
        ),
        (
            "POST",
            "/v1/users/bob/tokens",
            {"name": "ci"},
            "tokens.issue",
            {"user_id": "bob", "name": "ci"},
            201,
        ),
        ("GET", "/v1/users/bob/tokens", None, "tokens.list", {"user_id": "bob"}, 200),
        ("DELETE", "/v1/tokens/3", None, "tokens.revoke", {"token_id": "3"}, 204),
        (
            "POST",
            "/v1/grants",
            {
                "user_id": "bob",
                "client": "*",
                "listen_port_start": 10,
                "listen_port_end": 20,
                "protocols": ["udp"],
            },
            "grants.add",
            {
                "user_id": "bob",
                "client": "*",
                "listen_port_start": 10,
                "listen_port_end": 20,
                "protocols": ["udp"],
            },
            201,
        ),
        ("GET", "/v1/grants?user=bob", None, "grants.list", {"user_id": "bob"}, 200),
        ("GET", "/v1/grants", None, "grants.list", {}, 200),
        ("DELETE", "/v1/grants/4", None, "grants.revoke", {"grant_id": "4"}, 200),
    ],
)
async def test_route_to_rpc(
    api: httpx.AsyncClient,
    fake: FakeControl,
    method: str,
    path: str,
    body: Any,
    rpc: str,
    params: dict[str, Any],
    status: int,
) -> None:
    fake.replies[rpc] = {"ok": True}
    r = await api.request(method, path, headers=AUTH, json=body)
    assert r.status_code == status, r.text
    sent = fake.calls(rpc)
    assert len(sent) == 1 and sent[0]["params"] == params


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/users", {"user_id": 7}, "validation.user_id"),
        ("/v1/users", {"user_id": "bob", "role": "admin"}, "validation.role"),
        ("/v1/users", {"user_id": "bob", "extra": 1}, "validation.unknown_field"),
        (
            "/v1/grants",
            {"user_id": "bob", "client": "*", "listen_port_start": 0, "listen_port_end": 2},
            "validation.port_range",
        ),
        (
            "/v1/grants",
            {
                "user_id": "bob",
                "client": "*",
                "listen_port_start": 1,
                "listen_port_end": 2,
                "protocols": ["icmp"],
            },
            "validation.protocols",
        ),
        ("/v1/auth/login", {"user_id": "bob"}, "validation.password"),
    ],
)
async def test_bad_bodies_never_reach_control(
    api: httpx.AsyncClient, fake: FakeControl, path: str, body: Any, code: str
) -> None:
    r = await api.post(path, headers=AUTH, json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (400, code)
    assert "bob" not in str([q for q in fake.requests if q["method"] != "health"])


async def test_passwords_are_not_echoed_in_validation_errors(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/auth/login", json={"user_id": "bob", "password": "s3cret-" * 700})
    assert r.status_code == 400 and "s3cret" not in r.text
