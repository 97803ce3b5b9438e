"""Rule pages: the filtered list, the push form, a rule's detail with live counters,
its caps form, a retry of a failed rule, and removal with confirmation.  Each write
is the API's RPC."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portunus.errors import PortunusError
from portunus.web.routes.bodies import validate_body
from portunus.web.routes.common import call, rule_id
from portunus.web.ui import rule_form
from portunus.web.ui.base import Identity, field_errors, page, query_dict, read_form, redirect
from portunus.web.ui.charts import traffic_chart
from portunus.web.ui.client_choice import client_choice
from portunus.web.ui.render import render

PAGE_SIZE = 50
FILTERS = ("client", "owner", "state", "protocol")
LIVE_INTERVAL = 1.0
CURSOR_MAX = 256


@page
async def list_rules(request: Request, ident: Identity) -> Response:
    """One page of ``PAGE_SIZE`` rules: every filter goes to control, the next page is
    the same filters plus the opaque ``next_cursor`` (a bad cursor is control's
    ``validation.cursor``), so only the shown rows are read."""
    filters = query_dict(request, FILTERS)
    params: dict[str, Any] = {**filters, "limit": PAGE_SIZE}
    cursor = request.query_params.get("cursor", "")
    if cursor and len(cursor) <= CURSOR_MAX:  # opaque (store.paging); control checks it
        params["cursor"] = cursor
    rules, choice, summary = await asyncio.gather(
        call(request, "rules.list", params),
        client_choice(request, first=(("", "All clients"),)),
        call(request, "traffic.summary", {"limit": 0}),
    )
    return render(
        request,
        "rules.html",
        rules=rules["rules"],
        total=rules["total"],
        next_cursor=rules["next_cursor"],
        paged="cursor" in params,
        query=urlencode(filters),
        filters=filters,
        choice=choice,
        rates=summary.get("per_rule", {}),
        notice=request.query_params.get("notice"),
    )


async def _push_form(
    request: Request,
    ident: Identity,
    form: dict[str, str],
    status: int = 200,
    error: PortunusError | None = None,
) -> Response:
    choice = await client_choice(request, mark_offline=True)
    # A user pushes inside their grants: show them next to the form (control enforces them).
    grants = (
        []
        if ident.is_superadmin
        else (await call(request, "grants.list", {"user_id": ident.user}))["grants"]
    )
    errors = {rule_form.form_field(k): v for k, v in field_errors(error).items()} if error else {}
    return render(
        request,
        "rule_new.html",
        status=status,
        values=form,
        errors=errors,
        error=error,
        choice=choice,
        grants=grants,
        rows=rule_form.target_rows(form),
        caps=rule_form.CAP_FIELDS,
    )


@page
async def new_rule(request: Request, ident: Identity) -> Response:
    values = {
        "protocol": "tcp",
        "client": request.query_params.get("client", "local"),
        "targets[0].priority": "1",
    }
    return await _push_form(request, ident, values)


@page
async def push_rule(request: Request, ident: Identity) -> Response:
    form = await read_form(request)
    try:
        body = validate_body(rule_form.rule_body(form), "RuleBody")
        rule = await call(request, "rules.push", body)
    except PortunusError as err:
        return await _push_form(request, ident, form, status=err.http_status, error=err)
    return redirect(f"/rules/{rule['id']}?notice=pushed")


async def _detail(
    request: Request,
    ident: Identity,
    *,
    caps_form: dict[str, str] | None = None,
    error: PortunusError | None = None,
    retry_error: PortunusError | None = None,
    status: int = 200,
) -> Response:
    ident_id = rule_id(request)
    rule, stats, history = await asyncio.gather(
        call(request, "rules.get", {"id": ident_id}),
        call(request, "rules.stats", {"id": ident_id, "per_port": True, "per_target": True}),
        call(request, "traffic.query", {"rule": ident_id, "from": "1h"}),
    )
    values = (
        caps_form if caps_form is not None else rule_form.form_from_caps(rule.get("rate_limit"))
    )
    return render(
        request,
        "rule_detail.html",
        status=status,
        rule=rule,
        stats=stats,
        history=traffic_chart(history),
        live=f"/v1/rules/{ident_id}/stats/stream?interval={LIVE_INTERVAL:g}",
        values=values,
        errors=field_errors(error) if error else {},
        error=error,
        retry_error=retry_error,
        caps=rule_form.CAP_FIELDS,
        notice=request.query_params.get("notice"),
    )


@page
async def show_rule(request: Request, ident: Identity) -> Response:
    return await _detail(request, ident)


@page
async def update_caps(request: Request, ident: Identity) -> Response:
    form = await read_form(request)
    caps: dict[str, Any] = rule_form.caps_from_form(form)
    try:
        body = validate_body({"rate_limit": caps or None}, "RuleUpdate")
        await call(
            request, "rules.update", {"id": rule_id(request), "rate_limit": body["rate_limit"]}
        )
    except PortunusError as err:
        if err.code in ("rule_not_found", "not_owner"):
            raise
        return await _detail(request, ident, caps_form=form, error=err, status=err.http_status)
    return redirect(f"/rules/{rule_id(request)}?notice=caps")


@page
async def retry_rule(request: Request, ident: Identity) -> Response:
    """The "Retry" button of a failed rule: ``rules.retry`` now rather than at the
    data plane's next backoff step.  A refusal the operator can act on (the port is
    still taken, the client is offline or slow) shows on the detail page with its
    code; a missing or foreign rule is the usual error page."""
    ident_id = rule_id(request)
    try:
        await call(request, "rules.retry", {"id": ident_id})
    except PortunusError as err:
        if err.code in ("rule_not_found", "not_owner"):
            raise
        return await _detail(request, ident, retry_error=err, status=err.http_status)
    return redirect(f"/rules/{ident_id}?notice=retried")


@page
async def confirm_remove(request: Request, ident: Identity) -> Response:
    rule = await call(request, "rules.get", {"id": rule_id(request)})
    return render(request, "rule_remove.html", rule=rule)


@page
async def remove_rule(request: Request, ident: Identity) -> Response:
    ident_id = rule_id(request)
    await call(request, "rules.remove", {"id": ident_id})
    return redirect(f"/rules?notice=removed-{ident_id}")


routes = [
    Route("/rules", list_rules, methods=["GET", "HEAD"]),
    Route("/rules/new", new_rule, methods=["GET", "HEAD"]),
    Route("/rules/new", push_rule, methods=["POST"]),
    Route("/rules/{id}", show_rule, methods=["GET", "HEAD"]),
    Route("/rules/{id}/caps", update_caps, methods=["POST"]),
    Route("/rules/{id}/retry", retry_rule, methods=["POST"]),
    Route("/rules/{id}/remove", confirm_remove, methods=["GET", "HEAD"]),
    Route("/rules/{id}/remove", remove_rule, methods=["POST"]),
]
