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
from typing import Any

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_state = {"format": os.environ.get("PORTUNUS_LOG_FORMAT", "json"), "process": "", "level": 20}


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
    if _LEVELS.get(level, 20) < int(_state["level"]):
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
