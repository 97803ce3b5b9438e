"""owner_caps.list|get|set|delete through the RPC: validation shared with rule caps,
the pre-flight refusal, the capability gate, audit rows, and what the data plane
is sent (on every change and on every (re)connect)."""

from __future__ import annotations

from typing import Any

from portunus.control.store import accounts

from .conftest import audit_trail, expect_error

CAPS = {"bandwidth_in_bps": 1_000_000, "concurrent_connections": 4}


async def make_owner(harness: Any, user: str) -> None:
    """A ``user`` with a grant on every client and port: rules can be pushed for it."""
    await harness.call("users.add", {"user_id": user, "password": "correct horse battery"})
    await harness.call(
        "grants.add",
        {
            "user_id": user,
            "client": "*",
            "listen_port_start": 1,
            "listen_port_end": 65535,
            "protocols": "tcp,udp",
        },
    )


async def test_set_get_list_delete(harness: Any) -> None:
    for user in ("alice", "bob", "carol"):
        await make_owner(harness, user)
    got = await harness.call(
        "owner_caps.set", {"client": "local", "owner": "alice", "rate_limit": CAPS}
    )
    assert got["owner"] == "alice" and got["client"] == "local" and got["client_id"] == "local"
    assert got["rate_limit"] == CAPS and got["updated_at"].endswith("Z")
    assert harness.plane.caps_sent[-1] == ("local", {"alice": CAPS})
    assert await harness.call("owner_caps.get", {"client": "local", "owner": "alice"}) == got
    # Replaced, not merged: the caps object is the owner's whole envelope.
    again = await harness.call(
        "owner_caps.set",
        {"client": "local", "owner": "alice", "rate_limit": {"new_connections_per_sec": 7}},
    )
    assert again["rate_limit"] == {"new_connections_per_sec": 7}
    await harness.call("owner_caps.set", {"client": "local", "owner": "bob", "rate_limit": CAPS})
    assert harness.plane.caps_sent[-1] == (
        "local",
        {"alice": {"new_connections_per_sec": 7}, "bob": CAPS},
    )
    # An owner with rules but no cap is listed too.
    await harness.call(
        "rules.push",
        {"listen_port": 30010, "targets": [{"host": "127.0.0.1", "port": 9}], "owner": "carol"},
    )
    listing = await harness.call("owner_caps.list", {"client": "local"})
    assert [(o["owner"], o["rule_count"], o["rate_limit"]) for o in listing["owners"]] == [
        ("alice", 0, {"new_connections_per_sec": 7}),
        ("bob", 0, CAPS),
        ("carol", 1, None),
    ]
    assert await harness.call("owner_caps.delete", {"client": "local", "owner": "alice"}) == {}
    assert harness.plane.caps_sent[-1] == ("local", {"bob": CAPS})
    err = await expect_error(
        harness.call("owner_caps.get", {"client": "local", "owner": "alice"}), "owner_cap_not_found"
    )
    assert err.http_status == 404 and err.exit_code == 5
    await expect_error(
        harness.call("owner_caps.delete", {"client": "local", "owner": "alice"}),
        "owner_cap_not_found",
    )
    trail = await audit_trail(harness)
    assert trail.count(("operator", "owner_cap.set", "ok", None)) == 3
    assert ("operator", "owner_cap.delete", "ok", None) in trail
    assert ("operator", "owner_cap.delete", "error", "owner_cap_not_found") in trail


async def test_refusals(harness: Any) -> None:
    await make_owner(harness, "alice")

    def caps(rate_limit: Any, owner: Any = "alice", client: Any = "local") -> dict[str, Any]:
        return {"client": client, "owner": owner, "rate_limit": rate_limit}

    err = await expect_error(harness.call("owner_caps.set", caps({})), "preflight")
    assert err.exit_code == 3 and err.http_status == 400
    await expect_error(harness.call("owner_caps.set", caps(None)), "preflight")
    # The same validation as a rule's rate_limit.
    await expect_error(
        harness.call("owner_caps.set", caps({"bandwidth_in_bps": 0})), "validation.rate_limit"
    )
    await expect_error(
        harness.call("owner_caps.set", caps({"bandwith_in_bps": 5})), "validation.rate_limit"
    )
    await expect_error(
        harness.call("owner_caps.set", caps({"bandwidth_in_bps": True})), "validation.rate_limit"
    )
    await expect_error(
        harness.call("owner_caps.set", caps(CAPS, owner="Alice")), "validation.owner"
    )
    await expect_error(harness.call("owner_caps.set", caps(CAPS, owner="")), "validation.owner")
    await expect_error(
        harness.call("owner_caps.set", caps(CAPS, client="nope")), "client_not_found"
    )
    await expect_error(harness.call("owner_caps.list", {"client": "nope"}), "client_not_found")
    # A user id nobody has (a typo would never apply): 404, nothing stored.
    err = await expect_error(
        harness.call("owner_caps.set", caps(CAPS, owner="alcie")), "user_not_found"
    )
    assert err.http_status == 404 and err.exit_code == 5
    await expect_error(
        harness.call("owner_caps.get", {"client": "local", "owner": "alcie"}), "owner_cap_not_found"
    )
    await expect_error(
        harness.call("owner_caps.set", {**caps(CAPS), "extra": 1}), "validation.unknown_field"
    )
    assert harness.plane.caps_sent == []  # nothing refused reached the data plane
    trail = await audit_trail(harness)
    assert ("operator", "owner_cap.set", "error", "preflight") in trail
    assert ("operator", "owner_cap.set", "error", "validation.owner") in trail


async def test_capability_gate_and_offline_clients(harness: Any) -> None:
    for user in ("alice", "bob"):
        await make_owner(harness, user)
    async with harness.store.write() as db:
        old = await accounts.insert_client(db, "old-edge")
        new = await accounts.insert_client(db, "new-edge")
        away = await accounts.insert_client(db, "away")
    harness.plane.online |= {old.client_id, new.client_id}
    harness.plane.capabilities = {
        old.client_id: ["tcp", "udp"],
        new.client_id: ["tcp", "rate_limit"],
    }
    err = await expect_error(
        harness.call(
            "owner_caps.set", {"client": "old-edge", "owner": "alice", "rate_limit": CAPS}
        ),
        "rate_limit_unsupported_by_client",
    )
    assert err.http_status == 422 and err.details["capability"] == "rate_limit"
    with_cap = await harness.call(
        "owner_caps.set", {"client": new.client_id, "owner": "alice", "rate_limit": CAPS}
    )
    assert with_cap["client"] == "new-edge"
    assert harness.plane.caps_sent[-1] == (new.client_id, {"alice": CAPS})
    # An offline client's cap is stored; it goes out when the client connects.
    await harness.call("owner_caps.set", {"client": "away", "owner": "bob", "rate_limit": CAPS})
    harness.plane.online.add(away.client_id)
    harness.plane.caps_sent.clear()
    harness.service.client_connected(away.client_id)
    await harness.service.drain_events()
    assert harness.plane.caps_sent == [(away.client_id, {"bob": CAPS})]
    # ... and the full rule set follows.
    assert harness.plane.sent[-1][0] == "sync"
    assert (
        "operator",
        "owner_cap.set",
        "error",
        "rate_limit_unsupported_by_client",
    ) in await audit_trail(harness)


async def test_a_rule_carries_its_owner_to_the_data_plane(harness: Any) -> None:
    await make_owner(harness, "dave")
    rule = await harness.call(
        "rules.push",
        {"listen_port": 30011, "targets": [{"host": "127.0.0.1", "port": 9}], "owner": "dave"},
    )
    assert rule["owner"] == "dave"
    assert harness.plane.applies()[-1][2][0].owner == "dave"


async def test_owner_caps_are_superadmin_only(harness: Any) -> None:
    """A ``user`` may not read or change anyone's caps, its own included (403, exit 9)."""
    await make_owner(harness, "erin")
    token = (await harness.call("tokens.issue", {"user_id": "erin"}))["token"]
    calls = [
        ("owner_caps.list", {"client": "local"}),
        ("owner_caps.get", {"client": "local", "owner": "erin"}),
        ("owner_caps.set", {"client": "local", "owner": "erin", "rate_limit": CAPS}),
        ("owner_caps.delete", {"client": "local", "owner": "erin"}),
    ]
    for method, params in calls:
        err = await expect_error(harness.call(method, params, token=token), "role_required")
        assert err.http_status == 403 and err.exit_code == 9
    assert harness.plane.caps_sent == []
    trail = await audit_trail(harness)
    assert ("erin", "denied.owner_caps.set", "error", "role_required") in trail


async def test_removing_a_user_drops_its_caps(harness: Any) -> None:
    """A later user with the same id must not inherit the caps."""
    await make_owner(harness, "finn")
    await make_owner(harness, "gail")
    for owner in ("finn", "gail"):
        await harness.call(
            "owner_caps.set", {"client": "local", "owner": owner, "rate_limit": CAPS}
        )
    out = await harness.call("users.remove", {"user_id": "finn"})
    assert out["user_id"] == "finn"
    assert harness.plane.caps_sent[-1] == ("local", {"gail": CAPS})
    await expect_error(
        harness.call("owner_caps.get", {"client": "local", "owner": "finn"}), "owner_cap_not_found"
    )
    entries = (await harness.call("audit.list", {"limit": 10}))["entries"]
    removal = next(e for e in entries if e["action"] == "user.remove")
    assert removal["details"]["owner_caps"] == ["local"]
