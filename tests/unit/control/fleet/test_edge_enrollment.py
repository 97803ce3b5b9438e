"""clients.enroll and redeeming codes over TLS: one-time, TTL, hashed at rest."""

from __future__ import annotations

import re
from typing import Any

import pytest

from portunus.control.identity import hash_token

from ..conftest import audit_trail, expect_error
from .fake_edge import uri_parts

URI = re.compile(
    r"portunus://127\.0\.0\.1:(\d+)/enroll\?code=[A-Za-z0-9_-]{32}&fp=sha256:[0-9a-f]{64}"
)


async def test_enroll_returns_uri_and_command(edge: Any) -> None:
    got = await edge.call(
        "clients.enroll", {"name": "edge-01", "address": "127.0.0.1", "ttl_secs": 600}
    )
    assert set(got) == {"client_id", "client_name", "expires_at", "uri", "command"}
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", got["client_id"])
    assert got["client_name"] == "edge-01"
    m = URI.fullmatch(got["uri"])
    assert m and int(m.group(1)) == edge.port
    assert got["command"] == f"portunus-client enroll '{got['uri']}'"
    clients = (await edge.call("clients.list"))["clients"]
    assert [c["client_name"] for c in clients] == ["local", "edge-01"]
    assert clients[1]["connected"] is False
    # Only the hash of the code is stored.
    _, _, code, _ = uri_parts(got["uri"])
    async with edge.store.read() as db:
        async with db.execute("SELECT code_hash FROM client_enrollments") as cur:
            hashes = [r[0] for r in await cur.fetchall()]
    assert hashes == [hash_token(code)]
    assert ("operator", "client.enroll", "ok", None) in await audit_trail(edge)


async def test_enroll_ipv6_and_default_host(edge: Any) -> None:
    got = await edge.call("clients.enroll", {"name": "v6", "address": "::1"})
    assert got["uri"].startswith(f"portunus://[::1]:{edge.port}/enroll?code=")
    got = await edge.call(
        "clients.enroll", {"name": "dflt"}
    )  # control_listen host is 127.0.0.1 here
    assert got["uri"].startswith(f"portunus://127.0.0.1:{edge.port}/")


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"name": "local"}, "validation.name"),
        ({"name": ""}, "validation.name"),
        ({"name": "x" * 65}, "validation.name"),
        ({"name": "a\nb"}, "validation.name"),
        ({}, "validation.name"),
        ({"name": "e", "ttl_secs": 0}, "validation.ttl_secs"),
        ({"name": "e", "ttl_secs": True}, "validation.ttl_secs"),
        ({"name": "e", "address": "not a host"}, "validation.address"),
        ({"name": "e", "colour": "red"}, "validation.unknown_field"),
    ],
)
async def test_enroll_validation(edge: Any, params: dict[str, Any], code: str) -> None:
    err = await expect_error(edge.call("clients.enroll", params), code)
    assert err.exit_code == 2
    assert [c["client_name"] for c in (await edge.call("clients.list"))["clients"]] == ["local"]
    assert ("operator", "client.enroll", "error", code) in await audit_trail(edge)


async def test_redeem_gives_a_hashed_token_once(edge: Any) -> None:
    enrollment, enrolled = await edge.enroll("edge-01")
    assert enrolled["type"] == "enrolled"
    assert enrolled["client_id"] == enrollment["client_id"] and enrolled["client_name"] == "edge-01"
    assert len(enrolled["token"]) >= 40
    async with edge.store.read() as db:
        async with db.execute(
            "SELECT token_hash FROM clients WHERE client_id = ?", (enrolled["client_id"],)
        ) as cur:
            (stored,) = await cur.fetchone()
    assert stored == hash_token(enrolled["token"])
    # The same code again is refused, saying why.
    _, _, code, _ = uri_parts(enrollment["uri"])
    again = edge.fake()
    refused = await again.enroll(code)
    assert refused["type"] == "error" and refused["code"] == "enrollment_invalid"
    assert "already used" in refused["message"]
    await again.closed.wait()  # and the server closes the connection
    actions = await audit_trail(edge)
    assert (f"client:{enrolled['client_id']}", "client.enrolled", "ok", None) in actions
    assert ("edge", "client.enroll", "error", "enrollment_invalid") in actions


async def test_expired_and_unknown_codes_are_refused(edge: Any) -> None:
    enrollment = await edge.call("clients.enroll", {"name": "late", "address": "127.0.0.1"})
    _, _, code, _ = uri_parts(enrollment["uri"])
    async with edge.store.write() as db:  # let it expire without waiting
        await db.execute("UPDATE client_enrollments SET expires_at = '2000-01-01T00:00:00.000Z'")
    e = edge.fake()
    refused = await e.enroll(code)
    assert (refused["type"], refused["code"]) == ("error", "enrollment_invalid")
    assert "expired" in refused["message"]
    e2 = edge.fake()
    refused = await e2.enroll("no-such-code")
    assert "unknown enrollment code" in refused["message"]
    async with edge.store.read() as db:
        async with db.execute("SELECT token_hash FROM clients WHERE name = 'late'") as cur:
            assert (await cur.fetchone())[0] is None


async def test_first_frame_must_be_enroll_or_hello(edge: Any) -> None:
    e = edge.fake()
    await e.connect()
    await e.send({"type": "ping"})
    msg = await e.recv()
    assert (msg["type"], msg["code"]) == ("error", "bad_request")
    await e.closed.wait()
