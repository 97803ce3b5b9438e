"""Times as operators write them: RFC 3339, a Unix time, ``now``, or an age ago.

One parser for the CLI (``audit --since 1h``) and the control process (which also
receives the HTTP API's ``?since=`` untouched), so both accept the same forms.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"(\d+)([smhdw])")
_UNIT_SECS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
FORMS = "an RFC 3339 time (2024-05-01T12:00:00Z), a Unix time, `now`, or an age like 30m, 1h30m, 2d"


def parse_when(value: str | int | float, now: datetime | None = None) -> datetime:
    """Return an aware UTC datetime; naive times are UTC; raise ValueError otherwise."""
    now = now or datetime.now(UTC)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"{value!r} is out of range; use {FORMS}") from None
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not {FORMS}")
    compact = value.replace(" ", "").lower()
    if compact == "now":
        return now
    if compact and _RELATIVE.sub("", compact) == "":
        try:  # "99999999999999d" overflows timedelta/datetime: a refusal, not a crash
            secs = sum(int(n) * _UNIT_SECS[u] for n, u in _RELATIVE.findall(compact))
            return now - timedelta(seconds=secs)
        except (OverflowError, ValueError):
            raise ValueError(f"{value[:40]!r} is too far back; use {FORMS}") from None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value[:40]!r} is not {FORMS}") from None
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).astimezone(UTC)
