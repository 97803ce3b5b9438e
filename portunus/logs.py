"""Structured logs: one JSON object per line on stderr (``ts, level, event, ...``).

Every process of the tree logs through ``log_event``.  The format is chosen once
per process (``configure``) and inherited by forked children through the
``PORTUNUS_LOG_FORMAT`` environment variable, so a shard logs the same way as the
supervisor that forked it.  Writes are a single ``os.write`` of one line, which
keeps lines from different processes sharing stderr from interleaving.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypedDict

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class _LogState(TypedDict):
    format: str  # "json" or "text"
    process: str
    level: int


_state: _LogState = {
    "format": os.environ.get("PORTUNUS_LOG_FORMAT", "json"),
    "process": "",
    "level": 20,
}


def configure(fmt: str | None = None, process: str | None = None, level: str | None = None) -> None:
    """Set the format/process name for this process and its future children."""
    if fmt:
        _state["format"] = fmt
        os.environ["PORTUNUS_LOG_FORMAT"] = fmt
    if process is not None:
        _state["process"] = process
    if level:
        _state["level"] = _LEVELS.get(level, 20)
        os.environ["PORTUNUS_LOG_LEVEL"] = level
    elif "PORTUNUS_LOG_LEVEL" in os.environ:
        _state["level"] = _LEVELS.get(os.environ["PORTUNUS_LOG_LEVEL"], 20)


def log_event(event: str, level: str = "info", **fields: Any) -> None:
    """Write one log line; never raises (logging must not take a process down)."""
    if _LEVELS.get(level, 20) < _state["level"]:
        return
    try:
        now = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        if _state["format"] == "text":
            extras = " ".join(f"{k}={v}" for k, v in fields.items())
            proc = f" [{_state['process']}]" if _state["process"] else ""
            line = f"{ts} {level.upper():7s}{proc} {event} {extras}".rstrip() + "\n"
        else:
            record: dict[str, Any] = {"ts": ts, "level": level, "event": event}
            if _state["process"]:
                record["process"] = _state["process"]
            record.update(fields)
            line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        os.write(sys.stderr.fileno(), line.encode())
    except Exception:  # noqa: BLE001 - a broken stderr must not kill the data plane
        pass


class LogThrottle:
    """At most ``limit`` lines per event name per ``window`` seconds, then silence.

    For per-connection events (a failed connect, an fd shortage): a flood of them
    must not fill the journal or cost the event loop a write per connection.  The
    lines held back are counted and reported as one ``log.suppressed`` line (with
    the event name and count) when that event's window ends: on its next call, or
    on ``flush()``, which a process calls periodically so a flood that stopped is
    still accounted for.
    """

    __slots__ = ("limit", "window", "clock", "_windows")

    def __init__(
        self, limit: int = 10, window: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        # event -> [window start, lines written in it, lines suppressed in it, level]
        self._windows: dict[str, list[Any]] = {}

    def allow(self, event: str, level: str = "info") -> bool:
        """True when a line for ``event`` may be written now (and counts it)."""
        now = self.clock()
        w = self._windows.get(event)
        if w is None:
            self._windows[event] = [now, 1, 0, level]
            return True
        if now - w[0] >= self.window:
            self._summarize(event, w)
            w[0], w[1], w[2], w[3] = now, 1, 0, level
            return True
        if w[1] < self.limit:
            w[1] += 1
            return True
        w[2] += 1
        w[3] = level
        return False

    def flush(self) -> None:
        """Report the suppressed counts of every window that has ended; forget idle ones."""
        now = self.clock()
        for event, w in list(self._windows.items()):
            if now - w[0] >= self.window:
                self._summarize(event, w)
                del self._windows[event]

    def _summarize(self, event: str, w: list[Any]) -> None:
        if w[2]:
            log_event(
                "log.suppressed",
                level=w[3],
                suppressed_event=event,
                count=w[2],
                window_secs=self.window,
            )
            w[2] = 0


_THROTTLE = LogThrottle()


def log_throttled(event: str, level: str = "info", **fields: Any) -> None:
    """``log_event`` through this process's shared ``LogThrottle`` (per-connection events)."""
    if _THROTTLE.allow(event, level):
        log_event(event, level, **fields)


def flush_throttled() -> None:
    """Write the pending ``log.suppressed`` summaries (call about once a second)."""
    _THROTTLE.flush()
