"""The dashboard: clients, rules by state, throughput now and over the last hour
and day, top rules by bytes, and what needs attention (failed rules, offline
clients).  The RPCs are issued together; none reads more than one small page."""

from __future__ import annotations

import asyncio
from typing import Any

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
OFFLINE_SHOWN = 10
LOCAL = "local"


def _edge_count(page: dict[str, Any]) -> int:
    """``total`` without the local node: ``local`` heads the first page of any
    ``clients.list`` answer it is counted in, so that page tells."""
    heads = bool(page["clients"]) and page["clients"][0].get("client_id") == LOCAL
    return max(0, int(page["total"]) - heads)


@page
async def dashboard(request: Request, ident: Identity) -> Response:
    """Counts and the failed rules come from control already aggregated: with
    thousands of rules the page never lists them all."""
    counts, failed, every, up, down, summary, hour, day = await asyncio.gather(
        call(request, "rules.counts"),
        call(request, "rules.list", {"state": "failed", "limit": FAILED_SHOWN}),
        call(request, "clients.list", {"limit": 1}),
        call(request, "clients.list", {"connected": True, "limit": 1}),
        # one more than shown: ``local`` may head the page
        call(request, "clients.list", {"connected": False, "limit": OFFLINE_SHOWN + 1}),
        call(request, "traffic.summary", {"since": "1h", "limit": TOP}),
        call(request, "traffic.query", {"from": "1h"}),
        call(request, "traffic.query", {"from": "24h", "resolution": "hour"}),
    )
    offline = [c for c in down["clients"] if c.get("client_id") != LOCAL][:OFFLINE_SHOWN]
    return render(
        request,
        "dashboard.html",
        rules_total=counts["total"],
        states=[(s, counts["by_state"].get(s, 0)) for s in STATES],
        clients_total=_edge_count(every),
        clients_up=_edge_count(up),
        summary=summary,
        top=summary["top_rules"],
        hour=traffic_chart(hour),
        day=traffic_chart(day),
        hour_bytes=sum(p["bytes_in"] + p["bytes_out"] for p in hour["series"]),
        day_bytes=sum(p["bytes_in"] + p["bytes_out"] for p in day["series"]),
        failed=failed["rules"],
        failed_more=max(0, failed["total"] - len(failed["rules"])),
        offline=offline,
        offline_total=_edge_count(down),
    )


routes = [Route("/", dashboard, methods=["GET", "HEAD"])]
