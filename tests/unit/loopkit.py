"""What the unit tests that run a shard's TCP path on a real uvloop loop share.

test_pumps.py and test_native_tcp.py both need a fresh loop that collects the
exceptions its callbacks raise, a loopback listener, and a way to run the loop until a
condition holds; one copy here keeps them alike.  Import as ``from .loopkit import ...``
and expose the fixture in the test module with ``loop = pytest.fixture(new_loop)``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvloop

LOOPBACK = "127.0.0.1"


def new_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A uvloop loop whose callback exceptions land in ``loop.errors`` (tests assert it stays empty)."""
    lp = uvloop.new_event_loop()
    errors: list[dict[str, Any]] = []
    lp.set_exception_handler(lambda _lp, ctx: errors.append(ctx))
    lp.errors = errors  # type: ignore[attr-defined]
    yield lp
    lp.close()


def listener(backlog: int = 64) -> socket.socket:
    """A listening TCP socket on 127.0.0.1, on a port the kernel picks."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((LOOPBACK, 0))
    s.listen(backlog)
    return s


def run_until(
    loop: asyncio.AbstractEventLoop, cond: Callable[[], bool], timeout: float = 5.0
) -> None:
    """Run ``loop`` until ``cond()`` holds; fail the test after ``timeout`` seconds."""

    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached")
            await asyncio.sleep(0.01)

    loop.run_until_complete(poll())
