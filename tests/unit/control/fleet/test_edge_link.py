"""Sessions over real TLS: hello, sync on connect, push → applied → active, the
offline refusal, the capability gate, revoke, rename, stats, heartbeats."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from portunus.control.fleet.heap import pin_mmap_threshold, release_free_heap
from portunus.control.fleet.shedding import Shedder
from portunus.errors import PortunusError

from ..conftest import expect_error
from .fake_edge import ALL_CAPS

PUSH: dict[str, Any] = {"listen_port": 19090, "targets": [{"host": "127.0.0.1", "port": 9090}]}


async def client_row(edge: Any, client_id: str) -> dict[str, Any] | None:
    rows = (await edge.call("clients.list"))["clients"]
    return next((c for c in rows if c["client_id"] == client_id), None)


async def test_hello_sync_and_list_fields(edge: Any, poll: Any) -> None:
    e, enrolled = await edge.connect("edge-01", caps=["tcp", "sni"])
    sync = await e.recv("sync")
    assert sync["rules"] == []
    row = await client_row(edge, enrolled["client_id"])
    assert row is not None
    host, _, port = row["remote_addr"].rpartition(":")
    assert host == "127.0.0.1" and int(port) == e.writer.get_extra_info("sockname")[1]
    assert row["connected"] is True and row["version"] == "0.1.0"
    assert row["capabilities"] == ["tcp", "sni"] and row["rule_count"] == 0
    assert row["connected_since"].endswith("Z")
    assert edge.counts[-1] == 1
    await e.close()

    async def offline() -> bool:
        r = await client_row(edge, enrolled["client_id"])
        return r is not None and r["connected"] is False

    await poll(offline)
    assert edge.counts[-1] == 0


async def test_welcome_frame(edge: Any) -> None:
    _, enrolled = await edge.enroll("edge-01")
    e = edge.fake()
    welcome = await e.hello(enrolled["token"], enrolled["client_id"])
    assert welcome == {
        "type": "welcome",
        "client_id": enrolled["client_id"],
        "client_name": "edge-01",
        "heartbeat_secs": 5,
    }


async def test_bad_tokens_are_refused(edge: Any) -> None:
    _, enrolled = await edge.enroll("edge-01")
    for token, client_id in (
        ("wrong-token", enrolled["client_id"]),
        (enrolled["token"], "01OTHERCLIENT"),
        ("", None),
    ):
        e = edge.fake()
        msg = await e.hello(token, client_id)
        assert (msg["type"], msg["code"]) == ("error", "unauthenticated"), msg
        await asyncio.wait_for(e.closed.wait(), 5)
    assert not edge.link.connected(enrolled["client_id"])


async def test_push_to_connected_client_is_applied_then_active(edge: Any, poll: Any) -> None:
    e, enrolled = await edge.connect("edge-01")
    await e.recv("sync")
    rule = await edge.call("rules.push", {**PUSH, "client": "edge-01"})
    assert rule["state"] == "active" and rule["client"] == "edge-01"
    assert rule["client_id"] == enrolled["client_id"]
    apply = await e.recv("apply")
    assert apply["remove"] == [] and apply["upsert"][0]["id"] == str(rule["id"])
    assert apply["upsert"][0]["client"] == "edge-01" and apply["upsert"][0]["listen_start"] == 19090
    # By id works the same; a failed answer is activation_failed and the rule is kept failed.
    e.auto = ("failed", "port_in_use (port 19091 already bound)")
    err = await expect_error(
        edge.call("rules.push", {**PUSH, "listen_port": 19091, "client": enrolled["client_id"]}),
        "activation_failed",
    )
    assert err.details["rule"]["state"] == "failed"
    assert (await e.recv("apply"))["upsert"][0]["listen_start"] == 19091
    assert (await client_row(edge, enrolled["client_id"]))["rule_count"] == 2
    # Removal goes out as an apply and the row goes once the client says removed.
    await edge.call("rules.remove", {"id": rule["id"]})
    assert (await e.recv("apply"))["remove"] == [str(rule["id"])]

    async def gone() -> bool:
        return [
            r["id"] for r in (await edge.call("rules.list", {"client": "edge-01"}))["rules"]
        ] == [2]

    await poll(gone)


async def test_push_to_offline_client_stores_nothing(edge: Any) -> None:
    _, enrolled = await edge.enroll("edge-01")
    err = await expect_error(
        edge.call("rules.push", {**PUSH, "client": "edge-01"}), "client_not_connected"
    )
    assert err.exit_code == 8 and err.http_status == 422
    assert enrolled["client_id"] in err.message
    assert (await edge.call("rules.list"))["rules"] == []
    entries = (await edge.call("audit.list"))["entries"]
    assert (entries[0]["action"], entries[0]["outcome"], entries[0]["error_code"]) == (
        "rule.push",
        "error",
        "client_not_connected",
    )
    await expect_error(edge.call("rules.push", {**PUSH, "client": "ghost"}), "client_not_found")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"listen_port": 443, "sni_pattern": "api.example.com"}, "sni_unsupported_by_client"),
        ({"protocol": "udp"}, "udp_unsupported_by_client"),
        ({"proxy_protocol": "v2"}, "proxy_protocol_unsupported_by_client"),
        (
            {
                "listen_port": None,
                "listen_port_start": 19100,
                "listen_port_end": 19101,
                "targets": [{"host": "127.0.0.1", "port_start": 9100, "port_end": 9101}],
            },
            "range_unsupported_by_client",
        ),
        ({"rate_limit": {"bandwidth_in_bps": 1_000_000}}, "rate_limit_unsupported_by_client"),
    ],
)
async def test_capability_gate(edge: Any, body: dict[str, Any], code: str) -> None:
    e, enrolled = await edge.connect("plain", caps=["tcp"])
    await e.recv("sync")
    params = {**PUSH, "client": "plain", **body}
    params = {k: v for k, v in params.items() if v is not None}
    err = await expect_error(edge.call("rules.push", params), code)
    assert err.http_status == 422
    assert (await edge.call("rules.list"))["rules"] == []
    assert not [m for m in e.seen if m["type"] == "apply"]
    # The same rule goes to a client that advertises the feature.
    full, _ = await edge.connect("full")
    params["client"] = "full"
    assert (await edge.call("rules.push", params))["state"] == "active"


async def test_local_is_not_gated(edge: Any) -> None:
    rule = await edge.call(
        "rules.push",
        {
            "client": "local",
            "listen_port_start": 19100,
            "listen_port_end": 19101,
            "targets": [{"host": "127.0.0.1", "port_start": 9100, "port_end": 9101}],
        },
    )
    assert rule["state"] == "active"


async def test_revoke_kicks_within_a_second_and_kills_the_token(edge: Any, poll: Any) -> None:
    e, enrolled = await edge.connect("edge-01")
    await e.recv("sync")
    await edge.call("rules.push", {**PUSH, "client": "edge-01"})
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await edge.call("clients.revoke", {"id": enrolled["client_id"]})
    goodbye = await e.recv("error", timeout=1.0)
    assert goodbye["code"] == "revoked"
    await asyncio.wait_for(e.closed.wait(), 1.0)
    assert loop.time() - started < 1.0
    assert result["client_id"] == enrolled["client_id"] and result["revoked_at"]
    assert result["disconnected"] is True and result["connected"] is False
    assert await client_row(edge, enrolled["client_id"]) is None  # no longer listed
    assert edge.counts[-1] == 0
    again = edge.fake()
    refused = await again.hello(enrolled["token"], enrolled["client_id"])
    assert (refused["type"], refused["code"]) == ("error", "revoked")
    await expect_error(
        edge.call("rules.push", {**PUSH, "listen_port": 19092, "client": enrolled["client_id"]}),
        "client_not_found",
    )
    # Its rules stay until the client is deleted; revoking again is harmless.
    assert len((await edge.call("rules.list"))["rules"]) == 1
    assert (await edge.call("clients.revoke", {"id": enrolled["client_id"]}))[
        "disconnected"
    ] is False
    entries = (await edge.call("audit.list"))["entries"]
    assert ("client.revoke", "ok") in [(x["action"], x["outcome"]) for x in entries]


async def test_delete_needs_revoke_and_takes_the_rules(edge: Any) -> None:
    e, enrolled = await edge.connect("edge-01")
    await e.recv("sync")
    await edge.call("rules.push", {**PUSH, "client": "edge-01"})
    cid = enrolled["client_id"]
    err = await expect_error(edge.call("clients.delete", {"id": cid}), "conflict")
    assert err.exit_code == 10 and "revoke it first" in err.message
    await edge.call("clients.revoke", {"id": cid})
    assert await edge.call("clients.delete", {"id": cid}) == {}
    assert (await edge.call("rules.list"))["rules"] == []
    await expect_error(edge.call("clients.delete", {"id": cid}), "client_not_found")
    again = edge.fake()
    refused = await again.hello(enrolled["token"], cid)
    assert refused["code"] == "unauthenticated"


async def test_local_cannot_be_revoked_renamed_or_deleted(edge: Any) -> None:
    for method, extra in (
        ("clients.revoke", {}),
        ("clients.delete", {}),
        ("clients.rename", {"name": "x"}),
    ):
        await expect_error(edge.call(method, {"id": "local", **extra}), "conflict")


async def test_rename_keeps_id_rules_and_session(edge: Any, poll: Any) -> None:
    e, enrolled = await edge.connect("edge-01")
    await e.recv("sync")
    rule = await edge.call("rules.push", {**PUSH, "client": "edge-01"})
    row = await edge.call("clients.rename", {"id": "edge-01", "name": "edge-paris"})
    assert row["client_id"] == enrolled["client_id"] and row["client_name"] == "edge-paris"
    assert row["connected"] is True and row["rule_count"] == 1
    assert (await e.recv("renamed")) == {"type": "renamed", "client_name": "edge-paris"}
    assert not e.closed.is_set() and edge.link.connected(enrolled["client_id"])
    got = await edge.call("rules.get", {"id": rule["id"]})
    assert (got["client"], got["client_id"], got["state"]) == (
        "edge-paris",
        enrolled["client_id"],
        "active",
    )
    await expect_error(
        edge.call("rules.push", {**PUSH, "listen_port": 19092, "client": "edge-01"}),
        "client_not_found",
    )
    pushed = await edge.call("rules.push", {**PUSH, "listen_port": 19092, "client": "edge-paris"})
    assert (await e.recv("apply"))["upsert"][0]["client"] == "edge-paris"
    assert pushed["state"] == "active"
    await expect_error(
        edge.call("clients.rename", {"id": enrolled["client_id"], "name": "local"}),
        "validation.name",
    )
    # The ClientRename declaration, as PATCH /v1/clients/{id}/name checks it.
    await expect_error(
        edge.call("clients.rename", {"id": enrolled["client_id"], "name": 5}), "validation.name"
    )
    await expect_error(
        edge.call("clients.rename", {"id": enrolled["client_id"], "name": "a", "colour": 1}),
        "validation.unknown_field",
    )


async def test_stats_frames_feed_rule_stats(edge: Any, poll: Any) -> None:
    e, _ = await edge.connect("edge-01")
    await e.recv("sync")
    rule = await edge.call("rules.push", {**PUSH, "client": "edge-01"})
    zero = await edge.call("rules.stats", {"id": rule["id"]})
    assert zero == {
        "id": rule["id"],
        "bytes_in": 0,
        "bytes_out": 0,
        "connections_total": 0,
        "active_connections": 0,
    }
    await e.send(
        {
            "type": "stats",
            "rules": {
                str(rule["id"]): {
                    "bytes_in": 100,
                    "bytes_out": 2000,
                    "connections_total": 3,
                    "active_connections": 1,
                }
            },
        }
    )

    async def seen() -> bool:
        return (await edge.call("rules.stats", {"id": rule["id"]}))["bytes_out"] == 2000

    await poll(seen)
    full = await edge.call("rules.stats", {"id": rule["id"], "per_port": True, "per_target": True})
    assert full["per_port"] == [
        {
            "port": 19090,
            "bytes_in": 100,
            "bytes_out": 2000,
            "connections_total": 3,
            "active_connections": 1,
        }
    ]
    assert (
        full["per_target"][0]["target"] == "127.0.0.1:9090" and full["per_target"][0]["up"] is None
    )
    # The latest frame wins, garbage counts as 0, and it survives a disconnect.
    await e.send(
        {
            "type": "stats",
            "rules": {
                str(rule["id"]): {
                    "bytes_in": 5,
                    "bytes_out": "x",
                    "connections_total": -1,
                    "active_connections": 0,
                }
            },
        }
    )

    async def replaced() -> bool:
        return (await edge.call("rules.stats", {"id": rule["id"]}))["bytes_in"] == 5

    await poll(replaced)
    assert (await edge.call("rules.stats", {"id": rule["id"]}))["bytes_out"] == 0


async def test_new_hello_replaces_the_session(edge: Any) -> None:
    first, enrolled = await edge.connect("edge-01")
    await first.recv("sync")
    second = edge.fake()
    second.auto = ("active", None)
    assert (await second.hello(enrolled["token"], enrolled["client_id"]))["type"] == "welcome"
    await second.recv("sync")
    await asyncio.wait_for(first.closed.wait(), 2)
    assert edge.link.connected(enrolled["client_id"])
    assert edge.counts[-1] == 1
    await edge.call("rules.push", {**PUSH, "client": "edge-01"})
    assert (await second.recv("apply"))["upsert"][0]["listen_start"] == 19090


async def test_reconnect_gets_the_full_set_and_pending_rules_settle(edge: Any, poll: Any) -> None:
    e, enrolled = await edge.connect("edge-01", auto=None)
    await e.recv("sync")
    e.auto = None
    with pytest.raises(PortunusError) as info:
        await edge.call("rules.push", {**PUSH, "client": "edge-01", "ack_timeout": 0.2})
    assert info.value.code == "ack_timeout"
    await e.close()

    async def offline() -> bool:
        return not edge.link.connected(enrolled["client_id"])

    await poll(offline)
    back = edge.fake()
    back.auto = ("active", None)
    await back.hello(enrolled["token"], enrolled["client_id"])
    sync = await back.recv("sync")
    assert [r["listen_start"] for r in sync["rules"]] == [19090]

    async def active() -> bool:
        return (await edge.call("rules.list"))["rules"][0]["state"] == "active"

    await poll(active)


async def test_heartbeats_and_dead_link(make_edge: Any, poll: Any) -> None:
    edge = await make_edge(heartbeat_secs=0.1, dead_after_secs=0.6)
    e, enrolled = await edge.connect("edge-01")
    await e.recv("ping", timeout=2)  # the server pings an idle link
    # A client that keeps pinging stays connected past the dead interval ...
    for _ in range(8):
        await e.send({"type": "ping"})
        await asyncio.sleep(0.1)
    assert edge.link.connected(enrolled["client_id"])
    # ... and one that goes silent is dropped.
    await asyncio.wait_for(e.closed.wait(), 3)
    assert not edge.link.connected(enrolled["client_id"])


async def test_unknown_frames_are_ignored_and_garbage_closes(edge: Any) -> None:
    e, enrolled = await edge.connect("edge-01")
    await e.send({"type": "future-feature", "x": 1})
    await e.send({"type": "ping"})
    await e.recv("sync")
    assert edge.link.connected(enrolled["client_id"])
    e.writer.write(b"\x00\x00\x00\x02[]")
    await e.writer.drain()
    await asyncio.wait_for(e.closed.wait(), 3)


async def test_quiet_link_cadence_is_negotiated(make_edge: Any, poll: Any) -> None:
    """A client advertising quiet_link gets the slow cadence in its welcome, is pinged
    at it and dropped after its dead interval; an older client keeps heartbeat_secs."""
    edge = await make_edge(heartbeat_secs=0.1, dead_after_secs=5.0, quiet=(0.3, 0.2, 0.8))
    _, enrolled = await edge.enroll("quiet")
    q = edge.fake()
    loop = asyncio.get_running_loop()
    welcome = await q.hello(enrolled["token"], enrolled["client_id"], [*ALL_CAPS, "quiet_link"])
    t0 = loop.time()  # the hello was the last frame from q
    assert {k: welcome[k] for k in ("heartbeat_secs", "ping_secs", "dead_after_secs")} == {
        "heartbeat_secs": 0.3,
        "ping_secs": 0.2,
        "dead_after_secs": 0.8,
    }
    _, old_enrolled = await edge.enroll("old")
    old = edge.fake()
    old_welcome = await old.hello(old_enrolled["token"], old_enrolled["client_id"])
    assert old_welcome["heartbeat_secs"] == 0.1 and "ping_secs" not in old_welcome
    await q.recv("ping", timeout=2)
    await asyncio.wait_for(q.closed.wait(), 3)  # silent quiet client: dropped after ~0.8 s
    assert 0.7 <= loop.time() - t0 <= 2.0
    assert not edge.link.connected(enrolled["client_id"])
    # The older client (5 s dead interval here) is still up: it was not swept with the quiet one.
    assert edge.link.connected(old_enrolled["client_id"])


async def test_busy_server_sheds_hello_with_retry_after(make_edge: Any) -> None:
    """A deep event backlog: an authenticated hello is answered busy + retry_after and
    closed, nothing attached; when the backlog drains the same client gets in."""
    backlog = [5000]
    edge = await make_edge(shedder=Shedder(lambda: backlog[0], limit=2000))
    _, enrolled = await edge.enroll("storm")
    e = edge.fake()
    answer = await e.hello(enrolled["token"], enrolled["client_id"])
    assert answer["type"] == "error" and answer["code"] == "busy"
    assert answer["retry_after"] == 5 and "retry in 5 s" in answer["message"]
    await asyncio.wait_for(e.closed.wait(), 3)
    assert not edge.link.connected(enrolled["client_id"])
    # A bad token is still told so, not "busy".
    bad = edge.fake()
    assert (await bad.hello("not-a-token", None))["code"] == "unauthenticated"
    backlog[0] = 0
    ok = edge.fake()
    assert (await ok.hello(enrolled["token"], enrolled["client_id"]))["type"] == "welcome"


def test_shedder_retry_after_grows_with_the_backlog() -> None:
    depth = [0]
    s = Shedder(lambda: depth[0], limit=1000)
    assert s.retry_after() is None
    depth[0] = 999
    assert s.retry_after() is None
    depth[0] = 1000
    assert s.retry_after() == 2
    depth[0] = 10_000
    assert s.retry_after() == 20
    depth[0] = 10**9
    assert s.retry_after() == 60


def test_heap_release_is_safe_to_call() -> None:
    assert release_free_heap() in (True, False)
    assert pin_mmap_threshold() in (True, False)
