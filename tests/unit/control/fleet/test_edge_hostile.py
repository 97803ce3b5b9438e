"""Hostile values on the edge side: refused enrollments leave a bounded, escaped
audit row; frames nested too deep or with non-finite numbers are refused."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from portunus.control.store import write_audit
from portunus.edge.link import _check_rules
from portunus.errors import PortunusError
from portunus.ipc.edge_wire import WireError, read_frame


async def test_refused_long_client_name_is_bounded_in_the_audit_trail(edge: Any) -> None:
    name = "N" * 500
    with pytest.raises(PortunusError) as info:
        await edge.call("clients.enroll", {"name": name, "address": "127.0.0.1"})
    assert info.value.code == "validation.name"
    [entry] = [
        e
        for e in (await edge.call("audit.list", {"limit": 10}))["entries"]
        if e["action"] == "client.enroll"
    ]
    assert entry["outcome"] == "error"
    assert name not in entry["target"]
    assert len(entry["target"]) <= 200 + len("…(+400 chars)") + 20
    assert entry["target"].endswith("chars)")


async def test_control_characters_are_escaped_in_the_audit_trail(edge: Any) -> None:
    async with edge.store.write() as db:
        await write_audit(
            db,
            "op\x1b[31m",
            "client.enroll",
            "client-name:a\nb\u2028c",
            details={
                "name": "x\r\ny",
                "list": list(range(100)),
                "big": 10**40,
                "nested": {"a": {"b": {"c": {"d": {"e": 1}}}}},
            },
        )
    [entry] = (await edge.call("audit.list", {"limit": 1}))["entries"]
    assert entry["actor"] == "op\\x1b[31m"
    assert entry["target"] == "client-name:a\\x0ab\\u2028c"
    assert entry["details"]["name"] == "x\\x0d\\x0ay"
    assert len(entry["details"]["list"]) == 33 and entry["details"]["list"][-1] == "…+68 items"
    assert entry["details"]["big"] == str(10**40)
    assert isinstance(entry["details"]["nested"]["a"]["b"]["c"], str)


def _frame(body: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack(">I", len(body)) + body)
    reader.feed_eof()
    return reader


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 300_000 + b"]" * 300_000,
        b'{"type": "hello", "x": ' + b"[" * 100_000 + b"}",
        b'{"type": "stats", "bytes_in": 1e400}',
        b'{"type": "stats", "bytes_in": NaN}',
    ],
)
async def test_edge_frames_refuse_deep_and_non_finite_json(body: bytes) -> None:
    with pytest.raises(WireError):
        await read_frame(_frame(body))


def _wire(**over: Any) -> dict[str, Any]:
    rule = {
        "id": "7",
        "protocol": "tcp",
        "listen_start": 18080,
        "listen_end": 18080,
        "targets": [{"host": "127.0.0.1", "port": 80, "priority": 1}],
        "health_check_interval_secs": 5.0,
    }
    rule.update(over)
    return rule


@pytest.mark.parametrize(
    "over",
    [
        {"health_check_interval_secs": float("inf")},
        {"health_check_interval_secs": float("nan")},
        {"health_check_interval_secs": 0},
        {"listen_start": 70000},
        {"listen_end": True},
        {"targets": [{"host": "h", "port": 80, "priority": 10**6}]},
        {"rate_limit": {"bandwidth_in_bps": float("inf")}},
        {"rate_limit": {"bandwidth_in_bps": 10**20}},
    ],
)
def test_edge_client_fails_a_rule_with_bad_numbers_alone(over: dict[str, Any]) -> None:
    good, rejected = _check_rules(
        [_wire(**over), _wire(id="8", listen_start=18081, listen_end=18081)]
    )
    assert [g["id"] for g in good] == ["8"]
    assert rejected["7"]["state"] == "failed"
    assert rejected["7"]["reason"].startswith("malformed rule:")


async def test_hostile_answers_from_an_edge_client_are_bounded_and_harmless(edge: Any) -> None:
    """Huge rule ids, a megabyte reason and huge counters from a client change
    nothing they should not, and the server keeps serving that client."""
    e, _ = await edge.connect("edge-01")
    await e.recv("sync")
    push = {
        "client": "edge-01",
        "listen_port": 19090,
        "targets": [{"host": "127.0.0.1", "port": 9}],
    }
    first = await edge.call("rules.push", push)
    assert first["state"] == "active"
    await e.send(
        {
            "type": "applied",
            "results": {
                "9" * 30: {"state": "active"},
                "99999999999999999999": {"state": "failed", "reason": "x"},
                str(first["id"]): {"state": "failed", "reason": "r" * 1_000_000},
            },
        }
    )
    await e.send({"type": "removed", "ids": ["9" * 5000, 10**30, str(2**63)]})
    await e.send(
        {"type": "stats", "rules": {str(first["id"]): {"bytes_in": 10**40, "bytes_out": -5}}}
    )
    second = await edge.call("rules.push", {**push, "listen_port": 19091})
    assert second["state"] == "active", "the answer worker died"
    [got] = [
        r
        for r in (await edge.call("rules.list", {"client": "edge-01"}))["rules"]
        if r["id"] == first["id"]
    ]
    assert got["state"] == "failed" and len(got["failure_reason"]) == 500
    stats = await edge.call("rules.stats", {"id": first["id"]})
    assert stats["bytes_in"] == 0 and stats["bytes_out"] == 0
