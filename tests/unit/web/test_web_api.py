"""Auth, health, clients, audit and router errors of the /v1 API."""

from __future__ import annotations

import httpx
import pytest
from starlette.routing import Route

from portunus.config import Settings
from portunus.errors import PortunusError
from portunus.web.app import create_app

from .fakes import AUTH, TOKEN, FakeControl

PUBLIC = {"/v1/health", "/v1/openapi.json", "/v1/auth/login", "/v1/auth/setup"}


def protected_endpoints(settings: Settings) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, from the app itself, minus the public ones."""
    app = create_app(settings)
    out = []
    for r in app.routes:
        assert isinstance(r, Route)
        if r.path in PUBLIC or not r.path.startswith(
            "/v1/"
        ):  # pages: tests/unit/web/test_web_ui.py
            continue
        for method in sorted((r.methods or set()) - {"HEAD"}):
            out.append((method, r.path.replace("{id}", "7")))
    return out


async def test_every_protected_route_needs_a_bearer_token(
    api: httpx.AsyncClient, fake: FakeControl, settings: Settings
) -> None:
    endpoints = protected_endpoints(settings)
    assert len(endpoints) >= 9
    for header in (
        {},
        {"Authorization": "Basic dXNlcjpwdw=="},
        {"Authorization": "Bearer "},
        {"Authorization": TOKEN},
    ):
        for method, path in endpoints:
            r = await api.request(method, path, headers=header, json={"rate_limit": None})
            assert r.status_code == 401, (method, path, header)
            assert r.json()["error"]["code"] == "unauthenticated"
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert fake.requests == []


async def test_bearer_scheme_is_case_insensitive(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["clients.list"] = {"clients": []}
    r = await api.get("/v1/clients", headers={"Authorization": f"bearer  {TOKEN}"})
    assert r.status_code == 200
    assert fake.requests[0]["token"] == TOKEN


async def test_health_needs_no_token_and_asks_control(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    r = await api.get("/v1/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    assert [(q["method"], q["token"]) for q in fake.requests] == [("health", None)]


async def test_health_is_503_when_control_is_down_or_failing(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["health"] = PortunusError("internal", "database is locked")
    r = await api.get("/v1/health")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "unavailable"
    assert "database is locked" in r.json()["error"]["message"]
    await fake.stop()
    r = await api.get("/v1/health")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "unavailable"


async def test_control_down_is_503_on_other_routes(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    await fake.stop()
    r = await api.get("/v1/rules", headers=AUTH)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "unavailable"


async def test_clients_list(api: httpx.AsyncClient, fake: FakeControl) -> None:
    clients = {
        "clients": [
            {
                "client_id": "c1",
                "client_name": "edge-01",
                "connected": True,
                "remote_addr": "127.0.0.2:5000",
                "connected_since": "2026-01-01T00:00:00Z",
                "version": "0.1.0",
                "capabilities": ["sni"],
                "rule_count": 2,
            }
        ]
    }
    fake.replies["clients.list"] = clients
    r = await api.get("/v1/clients", headers=AUTH)
    assert (r.status_code, r.json()) == (200, clients)
    assert fake.calls("clients.list")[0]["token"] == TOKEN


async def test_clients_list_forwards_paging_and_filters(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["clients.list"] = {"clients": [], "next_cursor": None, "total": 0}
    r = await api.get(
        "/v1/clients?limit=5&cursor=abc&connected=false&name_prefix=edge-", headers=AUTH
    )
    assert r.status_code == 200
    assert fake.calls("clients.list")[0]["params"] == {
        "limit": 5,
        "cursor": "abc",
        "connected": False,
        "name_prefix": "edge-",
    }
    for bad in ("limit=0", "limit=1001", "limit=x", "connected=maybe"):
        r = await api.get(f"/v1/clients?{bad}", headers=AUTH)
        assert r.status_code == 400, bad
    assert len(fake.calls("clients.list")) == 1


async def test_client_get_by_ref(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["clients.get"] = {"client_id": "c1", "client_name": "edge-01"}
    r = await api.get("/v1/clients/edge-01", headers=AUTH)
    assert (r.status_code, r.json()["client_id"]) == (200, "c1")
    assert fake.calls("clients.get")[0]["params"] == {"id": "edge-01"}


async def test_audit_forwards_paging(api: httpx.AsyncClient, fake: FakeControl) -> None:
    page = {
        "entries": [
            {
                "id": 3,
                "ts": "2026-01-01T00:00:00Z",
                "actor": "admin",
                "action": "rules.push",
                "target": "rule 7",
                "outcome": "ok",
                "error_code": None,
            }
        ],
        "next_cursor": "c2",
    }
    fake.replies["audit.list"] = page
    r = await api.get("/v1/audit?since=2026-01-01T00:00:00Z&limit=50&cursor=c1", headers=AUTH)
    assert (r.status_code, r.json()) == (200, page)
    assert fake.calls("audit.list")[0]["params"] == {
        "since": "2026-01-01T00:00:00Z",
        "limit": 50,
        "cursor": "c1",
    }
    await api.get("/v1/audit", headers=AUTH)
    assert fake.calls("audit.list")[1]["params"] == {}


@pytest.mark.parametrize("limit", ["0", "1001", "ten", "1.5"])
async def test_audit_limit_is_checked(
    api: httpx.AsyncClient, fake: FakeControl, limit: str
) -> None:
    r = await api.get(f"/v1/audit?limit={limit}", headers=AUTH)
    assert r.status_code == 400
    assert (r.json()["error"]["code"], r.json()["error"]["field"]) == ("validation.query", "limit")
    assert fake.requests == []


async def test_unknown_route_is_404_envelope(api: httpx.AsyncClient) -> None:
    for path in ("/v1/nope", "/v1/rules/7/nope", "/elsewhere"):
        r = await api.get(path, headers=AUTH)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"


async def test_wrong_method_is_405_envelope_naming_allowed_methods(api: httpx.AsyncClient) -> None:
    r = await api.patch("/v1/rules/7", headers=AUTH)
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "DELETE, GET, HEAD, PUT"
    r = await api.post("/v1/health")
    assert r.status_code == 405


async def test_unexpected_failure_is_500_envelope_and_logged_without_token(
    api: httpx.AsyncClient, fake: FakeControl, capfd: pytest.CaptureFixture[str]
) -> None:
    fake.replies["rules.get"] = b"this is not json\n"
    r = await api.get("/v1/rules/7", headers=AUTH)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal"
    err = capfd.readouterr().err
    assert '"event":"web.internal_error"' in err
    assert TOKEN not in err
