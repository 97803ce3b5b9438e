"""Rule lifecycle through the RPC: pending → active | failed, ack timeouts, removal."""

from __future__ import annotations

from typing import Any

from portunus.control.store import accounts
from portunus.errors import PortunusError

from .conftest import audit_trail, expect_error

PUSH: dict[str, Any] = {"listen_port": 30005, "targets": [{"host": "127.0.0.1", "port": 40005}]}


async def test_push_activates(harness: Any) -> None:
    rule = await harness.call("rules.push", PUSH)
    assert rule["id"] == 1 and rule["state"] == "active" and rule["failure_reason"] is None
    assert (
        rule["client"] == "local" and rule["client_id"] == "local" and rule["listen_port"] == 30005
    )
    (kind, client_id, upsert, remove) = harness.plane.applies()[0]
    assert client_id == "local" and remove == []
    wire = upsert[0].to_wire()
    assert wire["id"] == "1" and wire["client"] == "local" and wire["owner"] == ""
    assert await harness.call("rules.get", {"id": 1}) == rule
    assert ("operator", "rule.push", "ok", None) in await audit_trail(harness)
    assert ("system", "rule.state", "ok", None) in await audit_trail(harness)


async def test_push_fails_and_keeps_slot(harness: Any) -> None:
    harness.plane.auto = ("failed", "port_in_use (port 30005 already bound)")
    err = await expect_error(harness.call("rules.push", PUSH), "activation_failed")
    assert err.message == "port_in_use (port 30005 already bound)"
    assert err.exit_code == 6
    assert err.details["rule"]["state"] == "failed"
    assert err.details["rule"]["failure_reason"] == "port_in_use (port 30005 already bound)"
    got = await harness.call("rules.get", {"id": 1})
    assert got["state"] == "failed"
    harness.plane.auto = ("active", None)
    await expect_error(harness.call("rules.push", PUSH), "port_conflict")
    assert ("system", "rule.state", "error", "activation_failed") in await audit_trail(harness)
    assert ("operator", "rule.push", "error", "port_conflict") in await audit_trail(harness)
    # Nothing of a failed rule is bound: removing it frees the slot at once.
    await harness.call("rules.remove", {"id": 1})
    await expect_error(harness.call("rules.get", {"id": 1}), "rule_not_found")
    assert harness.plane.applies()[-1][3] == ["1"]  # the node still forgets it
    assert (await harness.call("rules.push", PUSH))["state"] == "active"


async def test_ack_timeout_then_late_answer(harness: Any, poll: Any) -> None:
    harness.plane.auto = None
    err = await expect_error(
        harness.call("rules.push", {**PUSH, "ack_timeout": 0.2}), "ack_timeout"
    )
    assert err.exit_code == 7
    assert err.details["rule"]["state"] == "pending" and err.details["rule"]["id"] == 1
    assert (await harness.call("rules.get", {"id": 1}))["state"] == "pending"
    harness.plane.answer("local", {"1": ("active", None)})

    async def active() -> bool:
        return (await harness.call("rules.get", {"id": 1}))["state"] == "active"

    await poll(active)


async def test_late_failure_is_recorded(harness: Any, poll: Any) -> None:
    harness.plane.auto = None
    await expect_error(harness.call("rules.push", {**PUSH, "ack_timeout": 0.1}), "ack_timeout")
    harness.plane.answer("local", {"1": ("failed", "port_in_use (port 30005 already bound)")})

    async def failed() -> bool:
        got = await harness.call("rules.get", {"id": 1})
        return got["state"] == "failed" and got["failure_reason"].startswith("port_in_use")

    await poll(failed)


async def test_bad_ack_timeout(harness: Any) -> None:
    await expect_error(
        harness.call("rules.push", {**PUSH, "ack_timeout": 0}), "validation.ack_timeout"
    )
    await expect_error(
        harness.call("rules.push", {**PUSH, "ack_timeout": "2"}), "validation.ack_timeout"
    )


async def test_remove_drains_then_deletes(harness: Any, poll: Any) -> None:
    await harness.call("rules.push", PUSH)
    assert await harness.call("rules.remove", {"id": 1}) == {}
    assert (await harness.call("rules.get", {"id": 1}))["state"] == "draining"
    assert harness.plane.applies()[-1][3] == ["1"]
    # The port is free at once: draining rules give up their slot.
    again = await harness.call("rules.push", PUSH)
    assert again["id"] == 2 and again["state"] == "active"
    # A late "active" about the draining rule must not resurrect it.
    harness.plane.answer("local", {"1": ("active", None)})
    harness.plane.events.rules_removed("local", ["1"])

    async def gone() -> bool:
        try:
            await harness.call("rules.get", {"id": 1})
        except PortunusError as exc:
            return exc.code == "rule_not_found"
        return False

    await poll(gone)
    actions = await audit_trail(harness)
    assert ("operator", "rule.remove", "ok", None) in actions
    assert ("system", "rule.removed", "ok", None) in actions
    await expect_error(harness.call("rules.remove", {"id": 1}), "rule_not_found")


async def test_remove_while_node_offline_deletes_at_once(harness: Any) -> None:
    async with harness.store.write() as db:
        edge = await accounts.insert_client(db, "edge")
    harness.plane.online.add(edge.client_id)
    rule = await harness.call("rules.push", {**PUSH, "client": "edge"})
    assert rule["client"] == "edge" and rule["client_id"] == edge.client_id
    harness.plane.online.discard(edge.client_id)
    sent_before = len(harness.plane.sent)
    await harness.call("rules.remove", {"id": rule["id"]})
    await expect_error(harness.call("rules.get", {"id": rule["id"]}), "rule_not_found")
    assert len(harness.plane.sent) == sent_before


async def test_push_to_offline_or_unknown_client(harness: Any) -> None:
    async with harness.store.write() as db:
        a = await accounts.insert_client(db, "edge")
        await accounts.insert_client(db, "edge")
        solo = await accounts.insert_client(db, "solo")
    err = await expect_error(
        harness.call("rules.push", {**PUSH, "client": "solo"}), "client_not_connected"
    )
    assert err.exit_code == 8
    await expect_error(
        harness.call("rules.push", {**PUSH, "client": solo.client_id}), "client_not_connected"
    )
    amb = await expect_error(
        harness.call("rules.push", {**PUSH, "client": "edge"}), "ambiguous_client"
    )
    assert a.client_id in amb.details["client_ids"]
    await expect_error(harness.call("rules.push", {**PUSH, "client": "ghost"}), "client_not_found")
    assert (await harness.call("rules.list"))["rules"] == []
    assert harness.plane.sent == []


async def test_sni_sharing_through_rpc(harness: Any) -> None:
    base = {"listen_port": 8443, "targets": [{"host": "127.0.0.1", "port": 9000}]}
    await harness.call("rules.push", {**base, "sni_pattern": "api.example.com"})
    await harness.call("rules.push", {**base, "sni_pattern": "*.example.com"})
    fallback = await harness.call("rules.push", base)
    assert fallback["sni_pattern"] is None and fallback["state"] == "active"
    await expect_error(harness.call("rules.push", base), "port_conflict")
    plain = {"listen_port": 8444, "targets": [{"host": "127.0.0.1", "port": 9000}]}
    await harness.call("rules.push", plain)
    await expect_error(
        harness.call("rules.push", {**plain, "sni_pattern": "a.example.com"}),
        "conflict.legacy_to_sni_unsupported",
    )


async def test_validation_errors_are_audited(harness: Any) -> None:
    err = await expect_error(harness.call("rules.push", {"listen_port": 1}), "validation.targets")
    assert err.details["field"] == "targets"
    assert ("operator", "rule.push", "error", "validation.targets") in await audit_trail(harness)


async def test_update_rate_limit(harness: Any) -> None:
    await harness.call("rules.push", PUSH)
    updated = await harness.call(
        "rules.update", {"id": 1, "rate_limit": {"bandwidth_in_bps": 1000}}
    )
    assert updated["rate_limit"] == {"bandwidth_in_bps": 1000} and updated["state"] == "active"
    assert harness.plane.applies()[-1][2][0].rate_limit == {"bandwidth_in_bps": 1000}
    await expect_error(
        harness.call("rules.update", {"id": 1, "listen_port": 1}), "validation.immutable_field"
    )
    await expect_error(
        harness.call("rules.update", {"id": 99, "rate_limit": None}), "rule_not_found"
    )
    cleared = await harness.call("rules.update", {"id": "1", "rate_limit": None})
    assert cleared["rate_limit"] is None


async def test_list_filters_and_get_errors(harness: Any) -> None:
    await harness.call("rules.push", PUSH)
    await harness.call("rules.push", {**PUSH, "listen_port": 30006})
    listed = (await harness.call("rules.list"))["rules"]
    assert [r["id"] for r in listed] == [1, 2]
    assert [r["id"] for r in (await harness.call("rules.list", {"client": "local"}))["rules"]] == [
        1,
        2,
    ]
    assert (await harness.call("rules.list", {"owner": "someone"}))["rules"] == []
    await expect_error(harness.call("rules.list", {"client": "ghost"}), "client_not_found")
    await expect_error(harness.call("rules.get", {"id": 42}), "rule_not_found")
    await expect_error(harness.call("rules.get", {"id": "x"}), "validation.id")
    await expect_error(harness.call("rules.get", {}), "validation.id")


async def test_clients_list(harness: Any) -> None:
    await harness.call("rules.push", PUSH)
    async with harness.store.write() as db:
        edge = await accounts.insert_client(db, "edge")
    clients = (await harness.call("clients.list"))["clients"]
    assert [c["client_name"] for c in clients] == ["local", "edge"]
    local, remote = clients
    assert local["connected"] is True and local["rule_count"] == 1 and local["client_id"] == "local"
    assert remote == {
        "client_id": edge.client_id,
        "client_name": "edge",
        "connected": False,
        "remote_addr": None,
        "connected_since": None,
        "version": None,
        "capabilities": [],
        "rule_count": 0,
    }


async def test_audit_paging_and_filters(harness: Any) -> None:
    for port in range(31000, 31005):
        await harness.call("rules.push", {**PUSH, "listen_port": port})
    everything = (await harness.call("audit.list"))["entries"]
    ids = [e["id"] for e in everything]
    assert ids == sorted(ids, reverse=True)
    page1 = await harness.call("audit.list", {"limit": 3})
    assert len(page1["entries"]) == 3 and page1["next_cursor"] is not None
    page2 = await harness.call("audit.list", {"limit": 3, "cursor": page1["next_cursor"]})
    assert page2["entries"][0]["id"] < page1["entries"][-1]["id"]
    assert set(everything[0]) >= {"id", "ts", "actor", "action", "target", "outcome", "error_code"}
    assert (await harness.call("audit.list", {"since": "1h"}))["entries"] == everything
    assert (await harness.call("audit.list", {"until": "2000-01-01T00:00:00Z"}))["entries"] == []
    last = await harness.call("audit.list", {"limit": 1000})
    assert last["next_cursor"] is None
    await expect_error(harness.call("audit.list", {"limit": 0}), "validation.limit")
    await expect_error(harness.call("audit.list", {"limit": 1001}), "validation.limit")
    await expect_error(harness.call("audit.list", {"since": "yesterday-ish"}), "validation.since")
    # The cursor is opaque and checked: an edited one, a bare id, or another list's is refused.
    cur = page1["next_cursor"]
    for bad in (
        cur[:-2],
        str(page1["entries"][-1]["id"]),
        (await harness.call("clients.list", {"limit": 1})).get("next_cursor") or "x",
    ):
        await expect_error(harness.call("audit.list", {"cursor": bad}), "validation.cursor")


async def test_stats_of_unknown_rule_and_empty_metrics(harness: Any) -> None:
    await expect_error(harness.call("rules.stats", {"id": 1}), "rule_not_found")
    await harness.call(
        "rules.push",
        {
            "listen_port_start": 30000,
            "listen_port_end": 30002,
            "targets": [{"host": "127.0.0.1", "port_start": 40000, "port_end": 40002}],
        },
    )
    stats = await harness.call("rules.stats", {"id": 1, "per_port": True, "per_target": True})
    assert stats["id"] == 1 and stats["bytes_in"] == 0 and stats["active_connections"] == 0
    assert [p["port"] for p in stats["per_port"]] == [30000, 30001, 30002]
    assert stats["per_target"][0]["target"] == "127.0.0.1:40000-40002"
    assert stats["per_target"][0]["up"] is None
    await expect_error(
        harness.call("rules.stats", {"id": 1, "per_port": "yes"}), "validation.per_port"
    )


async def test_sync_sends_every_rule_and_pending_removals(harness: Any) -> None:
    await harness.call("rules.push", PUSH)
    await harness.call("rules.push", {**PUSH, "listen_port": 30006})
    await harness.call("rules.remove", {"id": 2})
    harness.plane.sent.clear()
    harness.plane.events.client_connected("local")
    await harness.service.drain_events()
    kinds = [(s[0], [r.id for r in s[2]], s[3]) for s in harness.plane.sent]
    assert kinds == [("sync", ["1"], []), ("apply", [], ["2"])]


async def test_a_reconfirmed_state_builds_no_rule(harness: Any, monkeypatch: Any) -> None:
    """After a restart every node re-confirms all of its rules at once: an answer
    that changes nothing, about a rule no push waits on, is checked against the
    rule's state alone (no rule is built); a change still reads and writes it."""
    from portunus.control.store import rules as rules_db

    for port in (30005, 30006, 30007):
        await harness.call("rules.push", {**PUSH, "listen_port": port})
    built: list[list[int]] = []
    real = rules_db.get_rules

    async def spy(db: Any, ids: list[int]) -> Any:
        built.append(list(ids))
        return await real(db, ids)

    monkeypatch.setattr(rules_db, "get_rules", spy)
    harness.plane.answer("local", {str(i): ("active", None) for i in (1, 2, 3)})
    await harness.service.drain_events()
    assert built == []
    harness.plane.answer("local", {"2": ("failed", "port_in_use (port 30006 already bound)")})
    await harness.service.drain_events()
    assert built == [[2]]  # inside the write transaction, as before
    assert (await harness.call("rules.get", {"id": 2}))["state"] == "failed"
    assert (await harness.call("rules.get", {"id": 1}))["state"] == "active"

    # A push waiting on a rule whose answer confirms its state still gets the rule.
    async with harness.store.read() as db:
        stored = await real(db, [3])
    got = await harness.service._send_and_wait(stored[0], 2.0)
    assert got is not None and got.rule_id == 3 and got.state == "active"
    assert built[-1] == [3]
