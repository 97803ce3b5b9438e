"""What the audit trail stores of a value: bounded and escaped.

Audit rows record refusals too, so their fields carry whatever a careless or
hostile caller sent (a 500-character client name, a name with a newline or an
ANSI escape).  Every string is cut to ``MAX_AUDIT_STRING`` characters with the
cut length noted, control characters are written as ``\\xNN`` escapes so a
terminal showing ``portunus-server audit`` shows them as text, and lists/objects
keep at most ``MAX_AUDIT_ITEMS`` entries and a few levels of nesting.
"""

from __future__ import annotations

import math
import re
from typing import Any

from portunus.bounds import MAX_AUDIT_ITEMS, MAX_AUDIT_STRING

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MAX_DEPTH = 4


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def audit_text(value: Any) -> str:
    """One audit string: escaped, then cut to ``MAX_AUDIT_STRING`` characters."""
    text = _CONTROL.sub(_escape, value if isinstance(value, str) else str(value))
    if len(text) <= MAX_AUDIT_STRING:
        return text
    return f"{text[:MAX_AUDIT_STRING]}…(+{len(text) - MAX_AUDIT_STRING} chars)"


def audit_value(value: Any, depth: int = 0) -> Any:
    """A JSON-safe, bounded copy of ``value`` for the ``details`` column."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**63 else audit_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        if depth >= _MAX_DEPTH:
            return audit_text(value)
        items = list(value.items())
        out = {audit_text(k): audit_value(v, depth + 1) for k, v in items[:MAX_AUDIT_ITEMS]}
        if len(items) > MAX_AUDIT_ITEMS:
            out["…"] = f"+{len(items) - MAX_AUDIT_ITEMS} entries"
        return out
    if isinstance(value, (list, tuple)):
        if depth >= _MAX_DEPTH:
            return audit_text(value)
        kept = [audit_value(v, depth + 1) for v in value[:MAX_AUDIT_ITEMS]]
        if len(value) > MAX_AUDIT_ITEMS:
            kept.append(f"…+{len(value) - MAX_AUDIT_ITEMS} items")
        return kept
    return audit_text(value)
