"""GET /v1/rules/{id}/stats/stream: Server-Sent Events of rule counters."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from portunus.config import Settings
from portunus.errors import PortunusError
from portunus.web.app import create_app

from .fakes import AUTH, STATS, TOKEN, FakeControl

GONE = PortunusError("rule_not_found", "rule 7 not found")


def parse_events(text: str) -> list[tuple[str, Any]]:
    """``[(event name, decoded data)]``; the default event name is ``message``."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data = json.loads(value)
        events.append((name, data))
    return events


async def test_stream_sends_stats_every_interval_then_ends_when_rule_is_gone(
    api: httpx.AsyncClient, fake: FakeControl, sequence: Callable[..., Any]
) -> None:
    fake.replies["rules.stats"] = sequence(
        STATS, {**STATS, "bytes_in": 11}, {**STATS, "bytes_in": 12}, GONE
    )
    start = time.monotonic()
    r = await api.get("/v1/rules/7/stats/stream?interval=0.2&per_target=true", headers=AUTH)
    elapsed = time.monotonic() - start
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    events = parse_events(r.text)
    assert [e[0] for e in events] == ["message", "message", "message", "end"]
    assert [e[1]["bytes_in"] for e in events[:3]] == [10, 11, 12]
    assert events[-1][1] == {"reason": "rule_not_found"}
    assert elapsed >= 0.55  # three waits of 0.2 s
    calls = fake.calls("rules.stats")
    assert len(calls) == 4
    assert all(c["params"] == {"id": 7, "per_target": True} and c["token"] == TOKEN for c in calls)


async def test_stream_uses_the_configured_interval_by_default(
    fake: FakeControl, settings: Settings, sequence: Callable[..., Any]
) -> None:
    settings.stats_stream_interval_secs = 0.05
    fake.replies["rules.stats"] = sequence(STATS, STATS, STATS, STATS, GONE)
    app = create_app(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as client:
        start = time.monotonic()
        r = await client.get("/v1/rules/7/stats/stream", headers=AUTH)
        assert time.monotonic() - start < 2.0  # not the 1 s default four times over
    assert [e[0] for e in parse_events(r.text)] == ["message"] * 4 + ["end"]


async def test_unknown_rule_is_a_plain_404_not_a_stream(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["rules.stats"] = GONE
    r = await api.get("/v1/rules/7/stats/stream", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "rule_not_found"


@pytest.mark.parametrize("interval", ["0.1", "61", "fast", "nan"])
async def test_interval_bounds(api: httpx.AsyncClient, fake: FakeControl, interval: str) -> None:
    r = await api.get(f"/v1/rules/7/stats/stream?interval={interval}", headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "interval"
    assert fake.requests == []


async def test_transient_control_failure_is_an_error_event_and_the_stream_goes_on(
    api: httpx.AsyncClient, fake: FakeControl, sequence: Callable[..., Any]
) -> None:
    down = PortunusError("unavailable", "control restarting")
    fake.replies["rules.stats"] = sequence(STATS, down, STATS, GONE)
    r = await api.get("/v1/rules/7/stats/stream?interval=0.2", headers=AUTH)
    events = parse_events(r.text)
    assert [e[0] for e in events] == ["message", "error", "message", "end"]
    assert events[1][1]["error"]["code"] == "unavailable"


async def test_revoked_token_ends_the_stream(
    api: httpx.AsyncClient, fake: FakeControl, sequence: Callable[..., Any]
) -> None:
    fake.replies["rules.stats"] = sequence(
        STATS, PortunusError("unauthenticated", "token revoked"), STATS
    )
    r = await api.get("/v1/rules/7/stats/stream?interval=0.2", headers=AUTH)
    events = parse_events(r.text)
    assert [e[0] for e in events] == ["message", "error", "end"]
    assert events[-1][1] == {"reason": "unauthenticated"}


def _scope(query: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "path": "/v1/rules/7/stats/stream",
        "raw_path": b"/v1/rules/7/stats/stream",
        "query_string": query,
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
        "scheme": "http",
        "server": ("api", 80),
        "client": ("127.0.0.1", 40000),
        "root_path": "",
    }


async def _run_until(app: Any, after_chunks: int, then: Callable[[], None]) -> list[bytes]:
    """Drive the app by hand; call ``then`` once ``after_chunks`` body chunks arrived."""
    chunks: list[bytes] = []
    disconnected = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) == after_chunks:
                then()

    app.state.disconnect = disconnected.set
    await asyncio.wait_for(app(_scope(b"interval=0.2"), receive, send), 5)
    return chunks


async def test_client_disconnect_stops_polling_control(
    fake: FakeControl, settings: Settings
) -> None:
    fake.replies["rules.stats"] = STATS
    app = create_app(settings)
    chunks = await _run_until(app, 2, lambda: app.state.disconnect())
    assert len(chunks) == 2
    polls = len(fake.calls("rules.stats"))
    await asyncio.sleep(0.7)  # several intervals: a live stream would have polled again
    assert len(fake.calls("rules.stats")) == polls


async def test_shutdown_ends_open_streams(fake: FakeControl, settings: Settings) -> None:
    fake.replies["rules.stats"] = STATS
    app = create_app(settings)
    chunks = await _run_until(app, 1, app.state.stopping.set)
    assert parse_events(b"".join(chunks).decode()) == [
        ("message", STATS),
        ("end", {"reason": "shutdown"}),
    ]
