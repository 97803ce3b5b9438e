"""Edge link frames: the classes read what a peer of the first release sends and
write the same JSON objects it wrote (field names, optional fields left out), ignore
kinds they do not know, and refuse a known kind with fields of the wrong type."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from portunus.ipc import edge_messages as em
from portunus.ipc.edge_wire import WireError, encode_frame, read_message

RULE = {"id": "7", "protocol": "tcp", "listen_port": 8080, "targets": []}

# (class instance, the JSON object the dict-built frames of the first release were)
WRITTEN: list[tuple[em.Frame, dict[str, Any]]] = [
    (
        em.Enroll(code="c0de", version="0.1.0"),
        {"type": "enroll", "code": "c0de", "version": "0.1.0"},
    ),
    (
        em.Hello(token="t", client_id="01H", version="0.1.0", capabilities=["tcp", "quiet_link"]),
        {
            "type": "hello",
            "token": "t",
            "client_id": "01H",
            "version": "0.1.0",
            "capabilities": ["tcp", "quiet_link"],
        },
    ),
    (em.Ping(), {"type": "ping"}),
    (
        em.Stats(rules={"7": {"bytes_in": 1}}, run="r1"),
        {"type": "stats", "rules": {"7": {"bytes_in": 1}}, "run": "r1"},
    ),
    (
        em.Applied(seq=3, results={"7": {"state": "active", "reason": None}}),
        {"type": "applied", "seq": 3, "results": {"7": {"state": "active", "reason": None}}},
    ),
    (em.Applied(seq=None, results={}), {"type": "applied", "seq": None, "results": {}}),
    (em.Removed(ids=["7"]), {"type": "removed", "ids": ["7"]}),
    (
        em.Enrolled(client_id="01H", client_name="edge", token="t"),
        {"type": "enrolled", "client_id": "01H", "client_name": "edge", "token": "t"},
    ),
    (
        em.Error(code="unauthenticated", message="no"),
        {"type": "error", "code": "unauthenticated", "message": "no"},
    ),
    (
        em.Error(code="busy", message="later", retry_after=4),
        {"type": "error", "code": "busy", "retry_after": 4, "message": "later"},
    ),
    (
        em.Welcome(client_id="01H", client_name="edge", heartbeat_secs=5),
        {"type": "welcome", "client_id": "01H", "client_name": "edge", "heartbeat_secs": 5},
    ),
    (
        em.Welcome(
            client_id="01H", client_name="edge", heartbeat_secs=20, ping_secs=20, dead_after_secs=30
        ),
        {
            "type": "welcome",
            "client_id": "01H",
            "client_name": "edge",
            "heartbeat_secs": 20,
            "ping_secs": 20,
            "dead_after_secs": 30,
        },
    ),
    (em.Sync(seq=1, rules=[RULE]), {"type": "sync", "seq": 1, "rules": [RULE]}),
    (
        em.Apply(seq=2, upsert=[], remove=["7"]),
        {"type": "apply", "seq": 2, "upsert": [], "remove": ["7"]},
    ),
    (em.OwnerCaps(caps={}), {"type": "owner_caps", "caps": {}}),
    (em.Renamed(client_name="edge-2"), {"type": "renamed", "client_name": "edge-2"}),
]


@pytest.mark.parametrize(
    ("frame", "wire"), WRITTEN, ids=lambda x: em.kind(x) if isinstance(x, em.Frame) else ""
)
def test_a_frame_is_written_as_the_first_release_wrote_it(
    frame: em.Frame, wire: dict[str, Any]
) -> None:
    assert json.loads(encode_frame(frame)[4:]) == wire


@pytest.mark.parametrize(
    ("frame", "wire"), WRITTEN, ids=lambda x: em.kind(x) if isinstance(x, em.Frame) else ""
)
def test_a_frame_of_the_first_release_is_read_as_its_class(
    frame: em.Frame, wire: dict[str, Any]
) -> None:
    assert em.parse(wire) == frame


def test_optional_and_unknown_fields() -> None:
    """An older server's welcome has no ping_secs; a newer peer may add fields."""
    welcome = em.parse({"type": "welcome", "client_id": "a", "client_name": "b", "extra": [1]})
    assert isinstance(welcome, em.Welcome) and welcome.ping_secs is None
    applied = em.parse({"type": "applied", "results": {}})  # unasked, seq left out
    assert isinstance(applied, em.Applied) and applied.seq is None


def test_an_unknown_kind_is_unknown_not_an_error() -> None:
    frame = em.parse({"type": "teleport", "to": "mars"})
    assert isinstance(frame, em.Unknown) and em.kind(frame) == "teleport"


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        ({"type": "sync", "seq": "1", "rules": []}, "$.seq"),
        ({"type": "sync", "seq": 1}, "rules"),
        ({"type": "apply", "seq": 1, "remove": "7"}, "$.remove"),
        ({"type": "removed", "ids": {"7": 1}}, "$.ids"),
        ({"type": "applied", "results": ["7"]}, "$.results"),
        ({"type": "renamed", "client_name": 5}, "$.client_name"),
        ({"type": "error", "message": "no code"}, "code"),
    ],
)
def test_a_known_kind_with_a_misfit_field_is_refused_by_name(
    wire: dict[str, Any], why: str
) -> None:
    with pytest.raises(em.FrameInvalid) as err:
        em.parse(wire)
    assert str(err.value).startswith(f"{wire['type']} frame:") and why in str(err.value)


def test_loose_fields_are_left_to_their_receiver() -> None:
    """A hostile hello's token of the wrong type reaches the gateway, which answers
    ``unauthenticated`` (control/fleet/gateway.py) instead of dropping the link."""
    hello = em.parse({"type": "hello", "token": 12, "capabilities": "all"})
    assert isinstance(hello, em.Hello) and hello.token == 12 and hello.capabilities == "all"


async def test_read_message_reports_a_misfit_as_a_wire_error() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(encode_frame({"type": "sync", "seq": None, "rules": []}))
    with pytest.raises(WireError, match=r"sync frame: .*\$\.seq"):
        await read_message(reader)
    reader = asyncio.StreamReader()
    reader.feed_data(encode_frame(em.Renamed(client_name="x")))
    assert await read_message(reader) == em.Renamed(client_name="x")
