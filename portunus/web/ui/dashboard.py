"""The dashboard: clients, rules by state, throughput now and over the last hour
and day, top rules by bytes, and what needs attention (failed rules, offline
clients).  Five RPCs, issued together."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portunus.web.routes.common import call
from portunus.web.ui.base import Identity, page
from portunus.web.ui.charts import traffic_chart
from portunus.web.ui.render import render

STATES = ("active", "pending", "failed", "draining", "revoked")
TOP = 8
FAILED_SHOWN = 20


@page
async def dashboard(request: Request, ident: Identity) -> Response:
    """Counts and the failed rules come from control already aggregated: with
    thousands of rules the page never lists them all."""
    counts, failed, clients, summary, hour, day = await asyncio.gather(
        call(request, "rules.counts"),
        call(request, "rules.list", {"state": "failed", "limit": FAILED_SHOWN}),
        call(request, "clients.list"),
        call(request, "traffic.summary", {"since": "1h", "limit": TOP}),
        call(request, "traffic.query", {"from": "1h"}),
        call(request, "traffic.query", {"from": "24h", "resolution": "hour"}),
    )
    client_list = [c for c in clients["clients"] if c.get("client_id") != "local"]
    offline = [c for c in client_list if not c.get("connected")]
    return render(
        request,
        "dashboard.html",
        rules_total=counts["total"],
        states=[(s, counts["by_state"].get(s, 0)) for s in STATES],
        clients_total=len(client_list),
        clients_up=len(client_list) - len(offline),
        summary=summary,
        top=summary["top_rules"],
        hour=traffic_chart(hour),
        day=traffic_chart(day),
        hour_bytes=sum(p["bytes_in"] + p["bytes_out"] for p in hour["series"]),
        day_bytes=sum(p["bytes_in"] + p["bytes_out"] for p in day["series"]),
        failed=failed["rules"],
        failed_more=max(0, failed["total"] - len(failed["rules"])),
        offline=offline,
    )


routes = [Route("/", dashboard, methods=["GET", "HEAD"])]
