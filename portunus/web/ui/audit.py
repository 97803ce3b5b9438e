"""The audit trail page (time range, actor and outcome filters, paged) and its
export as NDJSON or CSV: every matching entry, read page by page through the
same ``audit.list`` RPC as GET /v1/audit."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from portunus.web.routes.common import call
from portunus.web.ui.base import Identity, query_dict, superadmin_page
from portunus.web.ui.render import render

FILTERS = ("since", "until", "actor", "outcome")
PAGE = 50
EXPORT_PAGE = 1000
EXPORT_MAX = 200_000
COLUMNS = ("id", "ts", "actor", "action", "target", "outcome", "error_code", "details")


@superadmin_page
async def audit_page(request: Request, ident: Identity) -> Response:
    filters = query_dict(request, FILTERS)
    params: dict[str, Any] = {**filters, "limit": PAGE}
    cursor = request.query_params.get("cursor", "")
    if cursor and len(cursor) <= 256:  # opaque (store.paging); control checks it
        params["cursor"] = cursor
    result = await call(request, "audit.list", params)
    query = urlencode(filters)
    return render(
        request,
        "audit.html",
        entries=result["entries"],
        next_cursor=result["next_cursor"],
        filters=filters,
        query=query,
    )


def _csv_line(entry: dict[str, Any]) -> str:
    buf = io.StringIO()
    row = [entry.get(c) for c in COLUMNS]
    row[-1] = json.dumps(row[-1], separators=(",", ":")) if row[-1] is not None else ""
    csv.writer(buf, lineterminator="\n").writerow(["" if v is None else v for v in row])
    return buf.getvalue()


@superadmin_page
async def audit_export(request: Request, ident: Identity) -> Response:
    """The first page is read before the response starts, so a bad filter is an
    error page with its status, not a truncated download."""
    fmt = "csv" if request.query_params.get("format") == "csv" else "ndjson"
    params: dict[str, Any] = {**query_dict(request, FILTERS), "limit": EXPORT_PAGE}
    first = await call(request, "audit.list", params)

    async def lines() -> AsyncIterator[bytes]:
        if fmt == "csv":
            yield (",".join(COLUMNS) + "\n").encode()
        page, sent = first, 0
        while True:
            for entry in page["entries"]:
                text = (
                    _csv_line(entry)
                    if fmt == "csv"
                    else json.dumps(entry, separators=(",", ":")) + "\n"
                )
                yield text.encode()
                sent += 1
            if not page["next_cursor"] or sent >= EXPORT_MAX:
                return
            page = await call(request, "audit.list", {**params, "cursor": page["next_cursor"]})

    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson"
    headers = {
        "Content-Disposition": f'attachment; filename="portunus-audit.{fmt}"',
        "Cache-Control": "no-store",
    }
    return StreamingResponse(lines(), media_type=media, headers=headers)


routes = [
    Route("/audit", audit_page, methods=["GET", "HEAD"]),
    Route("/audit/export", audit_export, methods=["GET"]),
]
