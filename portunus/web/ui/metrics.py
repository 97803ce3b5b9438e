"""The metrics page: where /metrics is, and a short summary of the same
exposition (totals per family, resources per process), rendered from the files
the /metrics endpoint reads.  Superadmin only: it covers every owner's rules."""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portunus.config import parse_listen
from portunus.metrics import catalog as c
from portunus.web.routes.common import settings
from portunus.web.ui.base import Identity, superadmin_page
from portunus.web.ui.render import render

KEY_FAMILIES = (
    (c.CLIENTS_CONNECTED.name, "Clients connected", "count"),
    (c.RULE_ACTIVE.name, "Active connections", "count"),
    (c.RULE_CONNECTIONS.name, "Connections since start", "count"),
    (c.RULE_BYTES_IN.name, "Bytes in", "bytes"),
    (c.RULE_BYTES_OUT.name, "Bytes out", "bytes"),
    (c.UDP_FLOWS.name, "UDP flows", "count"),
    (c.SHARD_RESTARTS.name, "Shard restarts", "count"),
)
PROCESS = {c.PROCESS_RSS.name: "rss", c.PROCESS_CPU.name: "cpu", c.PROCESS_FDS.name: "fds"}


def summarize(text: str) -> tuple[dict[str, float], list[dict[str, Any]], int]:
    """Totals of the key families, per-process resources, and the number of families."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = defaultdict(float)
    procs: dict[str, dict[str, Any]] = defaultdict(dict)
    families = 0
    for family in text_string_to_metric_families(text):
        families += 1
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            if s.name in PROCESS:
                procs[s.labels.get("process", "?")][PROCESS[s.name]] = s.value
            else:
                totals[s.name] += s.value
    rows = [{"process": name, **vals} for name, vals in sorted(procs.items())]
    return dict(totals), rows, families


def metrics_url(request: Request) -> str:
    host, port = parse_listen(settings(request).metrics_listen, "metrics_listen")
    if host in ("0.0.0.0", "::"):
        host = request.url.hostname or "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


@superadmin_page
async def metrics_page(request: Request, ident: Identity) -> Response:
    from portunus.web.metrics import render_metrics

    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", settings(request).metrics_dir)
    supervisor = int(os.environ.get("PORTUNUS_SUPERVISOR_PID", "0")) or None
    text = (await asyncio.to_thread(render_metrics, metrics_dir, supervisor)).decode()
    totals, processes, families = summarize(text)
    key = [(label, totals.get(name, 0.0), kind) for name, label, kind in KEY_FAMILIES]
    return render(
        request,
        "metrics.html",
        url=metrics_url(request),
        key=key,
        processes=processes,
        families=families,
    )


routes = [Route("/metrics-summary", metrics_page, methods=["GET", "HEAD"])]
