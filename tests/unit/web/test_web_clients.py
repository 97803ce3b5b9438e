"""/v1/client-enrollments and /v1/clients/{id}/...: bodies, statuses, exact RPC params."""

from __future__ import annotations

import httpx

from portunus.errors import PortunusError

from .fakes import AUTH, FakeControl

ENROLLED = {
    "client_id": "01J",
    "client_name": "edge-01",
    "expires_at": "2026-01-01T00:10:00.000Z",
    "uri": "portunus://127.0.0.1:7443/enroll?code=c&fp=sha256:" + "0" * 64,
    "command": "portunus-client enroll 'portunus://127.0.0.1:7443/enroll?code=c&fp=sha256:"
    + "0" * 64
    + "'",
}
CLIENT = {
    "client_id": "01J",
    "client_name": "edge-paris",
    "connected": True,
    "remote_addr": "127.0.0.1:5",
    "connected_since": "2026-01-01T00:00:00.000Z",
    "version": "0.1.0",
    "capabilities": ["tcp"],
    "rule_count": 0,
}


async def test_enroll_is_201_with_the_enrollment(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["clients.enroll"] = ENROLLED
    r = await api.post(
        "/v1/client-enrollments",
        headers=AUTH,
        json={"name": "edge-01", "address": "127.0.0.1", "ttl_secs": 60},
    )
    assert (r.status_code, r.json()) == (201, ENROLLED)
    assert fake.calls("clients.enroll")[0]["params"] == {
        "name": "edge-01",
        "address": "127.0.0.1",
        "ttl_secs": 60,
    }
    r = await api.post("/v1/client-enrollments", headers=AUTH, json={"name": "edge-02"})
    assert r.status_code == 201
    assert fake.calls("clients.enroll")[1]["params"] == {"name": "edge-02"}


async def test_enroll_body_is_checked_before_control(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    for body, code in (
        ({}, "validation.name"),
        ({"name": ""}, "validation.name"),
        ({"name": "e", "ttl_secs": 0}, "validation.ttl_secs"),
        ({"name": "e", "ttl_secs": "600"}, "validation.ttl_secs"),
        ({"name": "e", "extra": 1}, "validation.unknown_field"),
    ):
        r = await api.post("/v1/client-enrollments", headers=AUTH, json=body)
        assert r.status_code == 400, body
        assert r.json()["error"]["code"] == code, (body, r.json())
    assert fake.calls("clients.enroll") == []


async def test_rename_revoke_delete(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["clients.rename"] = CLIENT
    r = await api.patch("/v1/clients/01J/name", headers=AUTH, json={"name": "edge-paris"})
    assert (r.status_code, r.json()) == (200, CLIENT)
    assert fake.calls("clients.rename")[0]["params"] == {"id": "01J", "name": "edge-paris"}
    r = await api.patch("/v1/clients/01J/name", headers=AUTH, json={"name": "x", "id": "other"})
    assert r.status_code == 400 and len(fake.calls("clients.rename")) == 1

    revoked = {
        **CLIENT,
        "connected": False,
        "revoked_at": "2026-01-01T00:01:00.000Z",
        "disconnected": True,
    }
    fake.replies["clients.revoke"] = revoked
    r = await api.post("/v1/clients/edge-paris/revoke", headers=AUTH)
    assert (r.status_code, r.json()) == (200, revoked)
    assert fake.calls("clients.revoke")[0]["params"] == {"id": "edge-paris"}

    r = await api.delete("/v1/clients/01J", headers=AUTH)
    assert r.status_code == 204 and r.content == b""
    assert fake.calls("clients.delete")[0]["params"] == {"id": "01J"}


async def test_client_errors_map_to_contract_statuses(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["clients.delete"] = PortunusError("conflict", "revoke it first")
    assert (await api.delete("/v1/clients/01J", headers=AUTH)).status_code == 409
    fake.replies["clients.revoke"] = PortunusError("client_not_found", "no client")
    assert (await api.post("/v1/clients/nope/revoke", headers=AUTH)).status_code == 404
    fake.replies["rules.push"] = PortunusError("sni_unsupported_by_client", "no sni")
    r = await api.post(
        "/v1/rules",
        headers=AUTH,
        json={
            "client": "edge",
            "listen_port": 443,
            "sni_pattern": "a.example.com",
            "targets": [{"host": "127.0.0.1", "port": 8443}],
        },
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "sni_unsupported_by_client")
    fake.replies["rules.push"] = PortunusError("client_not_connected", "offline")
    r = await api.post(
        "/v1/rules",
        headers=AUTH,
        json={
            "client": "edge",
            "listen_port": 19090,
            "targets": [{"host": "127.0.0.1", "port": 1}],
        },
    )
    assert r.status_code == 422
