"""What an operator's tools see of a large fleet: the Web UI's client list and a
Prometheus scrape, timed while every fake edge client is connected.

Issue 16 asks that the Web UI and ``/metrics`` stay fast with 10,000 clients, the
client page paged and the connected-clients gauge one series whatever the fleet.
``bench.edge_clients`` calls these with its server; they are separate so the
exposition counting can be checked on its own (bench/test_fleet_views.py).

- ``ui_clients``: sequential ``GET /clients`` (the HTML page, first page and a
  filtered one) on one keep-alive connection, as a browser would.
- ``scrape``: sequential ``GET /metrics`` on the metrics listener, as Prometheus
  would, plus what the last body holds (``exposition_counts``).
"""

from __future__ import annotations

import http.client
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.control_plane import Series
from tests.e2e.support import LOOPBACK, ServerProc

WARMUP = 3
# One row of the client table in the UI (templates/clients.html links each name).
_ROW = re.compile(rb'href="/clients/(?!enroll")[^"/]+"')
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s")


@dataclass
class Exposition:
    """What one scrape answered: bytes, samples, and samples per family."""

    size: int = 0
    samples: int = 0
    families: Counter[str] = field(default_factory=Counter)


def exposition_counts(text: str) -> Exposition:
    """Count samples per metric family in a Prometheus text exposition.  A histogram's
    ``_bucket``/``_sum``/``_count`` and a counter's ``_total``/``_created`` count
    under the name the sample carries (what a TSDB stores as series)."""
    out = Exposition(size=len(text.encode()))
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"not an exposition sample line: {line[:120]!r}")
        out.samples += 1
        out.families[m.group(1)] += 1
    return out


def _timed_gets(
    port: int, paths: list[str], n: int, headers: dict[str, str], series: Series
) -> bytes:
    """``n`` GETs cycling through ``paths`` after ``WARMUP`` untimed ones, on one
    keep-alive connection; each must answer 200.  Returns the last body."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
    body = b""
    try:
        for i in range(n + WARMUP):
            path = paths[i % len(paths)]
            t = time.perf_counter()
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            took = (time.perf_counter() - t) * 1000
            if resp.status != 200:
                raise RuntimeError(f"GET {path} answered {resp.status}: {body[:300]!r}")
            if i >= WARMUP:
                series.values.append(took)
    finally:
        conn.close()
    return body


def ui_clients(srv: ServerProc, n: int, connected: int) -> tuple[Series, int]:
    """The Web UI's client list with ``connected`` clients up: p50/p99 of the page and
    the number of client rows it rendered (a page, not the fleet)."""
    s = Series(f"Web UI `GET /clients` (HTML, one page), {connected} connected", "ms")
    body = _timed_gets(
        srv.api_port,
        ["/clients", "/clients?connected=true"],
        n,
        {"Authorization": f"Bearer {srv.token}", "Accept": "text/html"},
        s,
    )
    return s, len(set(_ROW.findall(body)))


def scrape(srv: ServerProc, n: int, connected: int) -> tuple[Series, Exposition]:
    """``GET /metrics`` timed ``n`` times with ``connected`` clients up, and the
    counts of the last exposition."""
    assert srv.metrics_port is not None
    s = Series(f"`GET /metrics` (Prometheus text), {connected} connected", "ms")
    body = _timed_gets(srv.metrics_port, ["/metrics"], n, {}, s)
    return s, exposition_counts(body.decode())
