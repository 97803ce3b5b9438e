"""Polling instead of blind sleeps: ``wait_for`` retries a condition until it holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import psutil

T = TypeVar("T")


def wait_for(
    cond: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``cond`` until it returns something truthy and return that value.

    Exceptions from ``cond`` count as "not yet" (a port not listening yet, a
    scrape refused); the last one is reported if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except (OSError, AssertionError, ValueError, KeyError, psutil.Error) as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            label = what() if callable(what) else what
            extra = f" (last error: {last_exc!r})" if last_exc is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {label}{extra}")
        time.sleep(interval)
