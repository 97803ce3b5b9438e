"""The dashboard: clients, rules by state, throughput now and over the last hour
and day, top rules by bytes, and what needs attention (failed rules, offline
clients).  Five RPCs, issued together."""

from __future__ import annotations

import asyncio
from collections import Counter

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portunus.web.routes.common import call
from portunus.web.ui.base import Identity, page
from portunus.web.ui.charts import traffic_chart
from portunus.web.ui.render import render

STATES = ("active", "pending", "failed", "draining")
TOP = 8


@page
async def dashboard(request: Request, ident: Identity) -> Response:
    clients, rules, summary, hour, day = await asyncio.gather(
        call(request, "clients.list"),
        call(request, "rules.list"),
        call(request, "traffic.summary", {"since": "1h", "limit": TOP}),
        call(request, "traffic.query", {"from": "1h"}),
        call(request, "traffic.query", {"from": "24h", "resolution": "minute"}),
    )
    rule_list = rules["rules"]
    by_id = {r["id"]: r for r in rule_list}
    states = Counter(r["state"] for r in rule_list)
    client_list = [c for c in clients["clients"] if c.get("client_id") != "local"]
    offline = [c for c in client_list if not c.get("connected") and not c.get("revoked")]
    failed = [r for r in rule_list if r["state"] == "failed"]
    return render(
        request,
        "dashboard.html",
        rules_total=len(rule_list),
        states=[(s, states.get(s, 0)) for s in STATES],
        clients_total=len(client_list),
        clients_up=sum(1 for c in client_list if c.get("connected")),
        summary=summary,
        top=[(t, by_id.get(t["rule"])) for t in summary["top_rules"]],
        hour=traffic_chart(hour),
        day=traffic_chart(day),
        hour_bytes=sum(p["bytes_in"] + p["bytes_out"] for p in hour["series"]),
        day_bytes=sum(p["bytes_in"] + p["bytes_out"] for p in day["series"]),
        failed=failed[:20],
        failed_more=max(0, len(failed) - 20),
        offline=offline,
    )


routes = [Route("/", dashboard, methods=["GET", "HEAD"])]
