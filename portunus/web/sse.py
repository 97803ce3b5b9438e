"""Server-Sent Events for live rule counters (``GET /v1/rules/{id}/stats/stream``).

One ``data: <stats JSON>`` event per interval, read afresh from the control process
each time (the web process caches nothing).  The stream ends with ``event: end``
when the rule is gone, the token stops being accepted, or the web process shuts
down; a client disconnect cancels the generator (Starlette's StreamingResponse
listens for ``http.disconnect``).  A control process that is briefly unreachable
yields ``event: error`` and the stream keeps trying, so a dashboard survives a
control restart.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from portunus.control.rpc.caller import ControlCaller
from portunus.errors import PortunusError

MIN_INTERVAL = 0.2
MAX_INTERVAL = 60.0
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def format_event(data: Any, event: str | None = None) -> bytes:
    """One SSE event; JSON has no raw newlines, so a single ``data:`` line suffices."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stopped_within(stopping: asyncio.Event, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):  # not wait_for: it can swallow a cancel on 3.11
            await stopping.wait()
    except TimeoutError:
        return False
    return True


async def stats_events(
    client: ControlCaller,
    creds: dict[str, Any],
    params: dict[str, Any],
    interval: float,
    first: Any,
    stopping: asyncio.Event,
) -> AsyncIterator[bytes]:
    """Yield ``first`` then a fresh ``rules.stats`` answer every ``interval`` seconds."""
    yield format_event(first)
    while True:
        if await _stopped_within(stopping, interval):
            yield format_event({"reason": "shutdown"}, event="end")
            return
        try:
            stats = await client.call("rules.stats", params, **creds)
        except PortunusError as err:
            if err.code == "rule_not_found":
                yield format_event({"reason": "rule_not_found"}, event="end")
                return
            yield format_event({"error": err.to_dict()}, event="error")
            if err.http_status < 500:
                # Auth revoked, forbidden...: retrying cannot help.
                yield format_event({"reason": err.code}, event="end")
                return
            continue
        yield format_event(stats)
