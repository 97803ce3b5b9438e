"""The paged list routes forward ?limit=&cursor= and their filters to control as the
RPC params (control checks the cursor and filters; the route only parses limit)."""

from __future__ import annotations

import httpx
import pytest

from .fakes import AUTH, FakeControl

PAGE = {"next_cursor": None, "total": 0}


@pytest.mark.parametrize(
    ("path", "method", "params"),
    [
        (
            "/v1/rules?limit=5&cursor=abc&client=edge-01&owner=alice&state=active&protocol=udp",
            "rules.list",
            {
                "limit": 5,
                "cursor": "abc",
                "client": "edge-01",
                "owner": "alice",
                "state": "active",
                "protocol": "udp",
            },
        ),
        ("/v1/rules?offset=10", "rules.list", {"offset": "10"}),  # control refuses it
        (
            "/v1/users?limit=2&cursor=c1&role=user&name_prefix=al",
            "users.list",
            {"limit": 2, "cursor": "c1", "role": "user", "name_prefix": "al"},
        ),
        ("/v1/users", "users.list", {}),
        (
            "/v1/users/bob/tokens?limit=1000&cursor=c2",
            "tokens.list",
            {"limit": 1000, "cursor": "c2", "user_id": "bob"},
        ),
        (
            "/v1/grants?user=bob&client=*&limit=1&cursor=c3",
            "grants.list",
            {"user_id": "bob", "client": "*", "limit": 1, "cursor": "c3"},
        ),
        ("/v1/grants?user=&client=", "grants.list", {}),
    ],
)
async def test_list_routes_forward_paging_and_filters(
    api: httpx.AsyncClient, fake: FakeControl, path: str, method: str, params: dict
) -> None:
    key = method.split(".")[0]
    fake.replies[method] = {key: [], **PAGE}
    r = await api.get(path, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {key: [], **PAGE}
    assert fake.calls(method)[-1]["params"] == params


@pytest.mark.parametrize("path", ["/v1/rules", "/v1/users", "/v1/users/bob/tokens", "/v1/grants"])
@pytest.mark.parametrize("bad", ["limit=0", "limit=1001", "limit=x", "limit=1.5"])
async def test_bad_limit_is_400_before_control(
    api: httpx.AsyncClient, fake: FakeControl, path: str, bad: str
) -> None:
    r = await api.get(f"{path}?{bad}", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "validation.query"
    assert not fake.requests or all(q["method"] == "auth.whoami" for q in fake.requests)
