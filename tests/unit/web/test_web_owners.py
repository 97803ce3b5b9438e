"""/v1/clients/{id}/owners...: per-owner caps, one RPC each; the PUT body is the
bare caps object, checked at the boundary like a rule's rate_limit."""

from __future__ import annotations

import httpx
import pytest

from portunus.errors import PortunusError

from .fakes import AUTH, FakeControl

CAP = {
    "client_id": "local",
    "client": "local",
    "owner": "alice",
    "rate_limit": {"bandwidth_in_bps": 1000},
    "updated_at": "2026-12-05T10:00:00.000Z",
}


async def test_put_forwards_the_bare_caps(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["owner_caps.set"] = CAP
    r = await api.put(
        "/v1/clients/edge-01/owners/alice/rate-limit",
        headers=AUTH,
        json={"bandwidth_in_bps": 1000, "concurrent_connections_burst": None},
    )
    assert r.status_code == 200 and r.json() == CAP
    assert fake.calls("owner_caps.set")[0]["params"] == {
        "client": "edge-01",
        "owner": "alice",
        "rate_limit": {"bandwidth_in_bps": 1000, "concurrent_connections_burst": None},
    }


@pytest.mark.parametrize(
    "body", [{"bandwith_in_bps": 5}, {"bandwidth_in_bps": 0}, {"bandwidth_in_bps": "5"}, [1], None]
)
async def test_put_refuses_a_bad_body_before_control(
    api: httpx.AsyncClient, fake: FakeControl, body: object
) -> None:
    r = await api.put("/v1/clients/local/owners/alice/rate-limit", headers=AUTH, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"].startswith("validation")
    assert fake.calls("owner_caps.set") == []


async def test_get_list_delete(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["owner_caps.get"] = CAP
    r = await api.get("/v1/clients/local/owners/alice/rate-limit", headers=AUTH)
    assert r.status_code == 200 and r.json() == CAP
    fake.replies["owner_caps.list"] = {"client_id": "local", "client": "local", "owners": []}
    r = await api.get("/v1/clients/local/owners", headers=AUTH)
    assert r.status_code == 200 and fake.calls("owner_caps.list")[0]["params"] == {
        "client": "local"
    }
    r = await api.delete("/v1/clients/local/owners/alice/rate-limit", headers=AUTH)
    assert r.status_code == 204 and fake.calls("owner_caps.delete")[0]["params"] == {
        "client": "local",
        "owner": "alice",
    }


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("owner_cap_not_found", 404),
        ("preflight", 400),
        ("rate_limit_unsupported_by_client", 422),
        ("client_not_found", 404),
        ("ambiguous_client", 409),
    ],
)
async def test_errors_keep_their_status(
    api: httpx.AsyncClient, fake: FakeControl, code: str, status: int
) -> None:
    fake.replies["owner_caps.set"] = PortunusError(code, "no")
    r = await api.put(
        "/v1/clients/x/owners/alice/rate-limit", headers=AUTH, json={"bandwidth_in_bps": 5}
    )
    assert r.status_code == status and r.json()["error"]["code"] == code
