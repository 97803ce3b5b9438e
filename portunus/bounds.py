"""Every number an operator or a peer can hand us, and the range it must lie in.

One table owns the numeric rules so that the CLI option types, the HTTP body
schemas, the TOML loaders (standalone and server.toml), the control socket and
the edge wire refuse the same values with the same words.  Every bound is
finite: ``inf``, ``nan`` and ``1e400`` (which JSON parses to ``inf``) are refused
everywhere, because a non-finite number that reaches the store or a timer turns
into a 500, invalid JSON output or a process that cannot be stopped.  The ranges
are documented in docs/limits.md; keep the two in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from portunus.errors import ValidationError


@dataclass(frozen=True, slots=True)
class Bound:
    """A closed range ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``) of ints or numbers."""

    lo: float
    hi: float
    integer: bool = False
    lo_open: bool = False

    def contains(self, value: Any) -> bool:
        """True for a finite int/float (never a bool) of the right kind inside the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        low_ok = value > self.lo if self.lo_open else value >= self.lo
        return low_ok and value <= self.hi

    def text(self) -> str:
        """``1-65535`` for integers, ``(0, 300]`` / ``[0.1, 3600]`` for numbers."""
        if self.integer:
            return f"{self.lo:g}-{self.hi:g}" if self.hi < 1e6 else f"{int(self.lo)}-{int(self.hi)}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"

    def check(self, value: Any, field: str, code: str | None = None) -> Any:
        """``value`` (an ``int`` for integer bounds, else a ``float``) or a ValidationError
        naming ``field``; ``code`` defaults to ``validation.<field>``."""
        if self.contains(value):
            return value if self.integer else float(value)
        code = code or f"validation.{field.split('.')[-1].split('[')[0]}"
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, float) and not math.isfinite(value):
            got = "a non-finite number"
        elif isinstance(value, bool):
            got = "true" if value else "false"
        elif isinstance(value, str):
            got = "a string"
        elif not isinstance(value, (int, float)):
            got = "null" if value is None else f"a {type(value).__name__}"
        else:
            got = repr(value)
        raise ValidationError(
            code, f"{field} must be {kind} in {self.text()}, got {got}", field=field
        )

    def schema(self, **extra: Any) -> dict[str, Any]:
        """The JSON Schema fragment of this bound (OpenAPI 3.1)."""
        out: dict[str, Any] = {"type": "integer" if self.integer else "number"}
        out["exclusiveMinimum" if self.lo_open else "minimum"] = (
            int(self.lo) if self.integer else self.lo
        )
        out["maximum"] = int(self.hi) if self.integer else self.hi
        out.update(extra)
        return out

    def parse_text(self, text: str, field: str, code: str | None = None) -> Any:
        """A number typed on a command line or in a query string, checked."""
        s = text.strip()
        try:
            value: Any = int(s) if self.integer else float(s)
        except ValueError:
            value = s
        return self.check(value, field, code)


def finite(value: Any) -> bool:
    """True for an int or a finite float (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not (isinstance(value, float) and not math.isfinite(value))


# ------------------------------------------------------------------ the table

PORT = Bound(1, 65535, integer=True)
PRIORITY = Bound(1, 1000, integer=True)
RATE_LIMIT_VALUE = Bound(1, 10**12, integer=True)
HEALTH_CHECK_INTERVAL = Bound(0.1, 3600)
# A rule's idle_timeout_secs (absent/null = never); 0 would close every connection at once.
IDLE_TIMEOUT = Bound(0, 7 * 86400, lo_open=True)
ACK_TIMEOUT = Bound(0, 300, lo_open=True)
ENROLL_TTL = Bound(1, 7 * 86400, integer=True)
LIST_LIMIT = Bound(1, 1000, integer=True)  # ?limit= of every paged list
NAME_PREFIX_LEN = Bound(1, 64, integer=True)  # ?name_prefix= of users.list (characters)
AUDIT_LIMIT = LIST_LIMIT
STATS_INTERVAL = Bound(0.2, 60)  # ?interval= of the SSE stream
CLI_INTERVAL = Bound(0.1, 3600)  # --interval / --stats-interval / --timeout of the CLIs
SHARDS = Bound(1, 256, integer=True)  # --shards; `shards = 0` in TOML means one per CPU
HEARTBEAT = Bound(0, 3600, lo_open=True)
CLIENT_ID_INT = Bound(1, 10**18, integer=True)
RULE_ID = Bound(1, 2**63 - 1, integer=True)  # SQLite INTEGER

# server.toml / standalone TOML top-level keys.
SETTINGS: dict[str, Bound] = {
    "shutdown_drain_timeout_secs": Bound(0, 3600),
    "udp_flow_idle_secs": Bound(0, 86400, lo_open=True),
    "connect_timeout_secs": Bound(0, 300, lo_open=True),
    "ack_timeout_secs": Bound(0, 300, lo_open=True),
    "stats_stream_interval_secs": Bound(0, 60, lo_open=True),
    "range_rule_max_ports": Bound(1, 65535, integer=True),
    "udp_max_flows": Bound(1, 1_000_000, integer=True),
    "shards": Bound(0, 256, integer=True),
    # A deadline or interval of 0 would refuse everyone or spin: above 0.
    "edge_handshake_timeout_secs": Bound(0, 300, lo_open=True),
    "edge_preauth_park_secs": Bound(0, 300, lo_open=True),
    "traffic_sample_interval_secs": Bound(0, 3600, lo_open=True),
    "edge_preauth_max_connections": Bound(1, 1_000_000, integer=True),
    "edge_preauth_max_per_source": Bound(1, 1_000_000, integer=True),
    "http_request_timeout_secs": Bound(0, 300, lo_open=True),
    "http_max_connections": Bound(1, 1_000_000, integer=True),
    "sni_client_hello_timeout_secs": Bound(0, 300, lo_open=True),
}

# ------------------------------------------------------------------ sizes

MAX_NAME_LEN = 64  # client names, standalone rule names
MAX_HOST_LEN = 253  # DNS names (an IPv6 literal is shorter)
MAX_SNI_LEN = 253
MAX_ADDRESS_LEN = 255
MAX_JSON_DEPTH = 32  # every JSON document we parse: HTTP bodies, control socket, edge link
MAX_AUDIT_STRING = 200  # one string value stored in the audit trail
MAX_AUDIT_ITEMS = 32  # list/object entries stored in one audit value
