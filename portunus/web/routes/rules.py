"""/v1/rules: push, list, show, hot-update caps, retry, remove, stats and the stats stream."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from portunus.errors import ValidationError
from portunus.web import sse
from portunus.web.routes.bodies import read_json
from portunus.web.routes.common import (
    bearer_token,
    call,
    control,
    endpoint,
    query_bool,
    query_number,
    route,
    rule_id,
    settings,
)
from portunus.web.routes.list_query import list_params


@endpoint
async def list_rules(request: Request) -> Response:
    """One page (``?limit=&cursor=&client=&owner=&state=&protocol=``).  ``offset`` is
    passed on so control refuses it (``validation.offset``) instead of it being
    ignored: a client still paging by offset would get the first page forever."""
    params: dict[str, Any] = {
        k: request.query_params[k]
        for k in ("client", "owner", "state", "protocol", "offset")
        if k in request.query_params
    }
    return JSONResponse(await call(request, "rules.list", {**params, **list_params(request)}))


@endpoint
async def push_rule(request: Request) -> Response:
    bearer_token(request)  # 401 before looking at the body
    ack = query_number(request, "ack_timeout", 0.0, 60.0, open_lo=True)
    params: dict[str, Any] = dict(await read_json(request, "RuleBody"))
    if ack is not None:
        params["ack_timeout"] = ack
    rule = await call(request, "rules.push", params)
    headers = (
        {"Location": f"/v1/rules/{rule['id']}"} if isinstance(rule, dict) and "id" in rule else None
    )
    return JSONResponse(rule, status_code=201, headers=headers)


@endpoint
async def get_rule(request: Request) -> Response:
    return JSONResponse(await call(request, "rules.get", {"id": rule_id(request)}))


@endpoint
async def update_rule(request: Request) -> Response:
    bearer_token(request)
    ident = rule_id(request)
    body = await read_json(request, "RuleUpdate")
    params: dict[str, Any] = {k: body[k] for k in ("rate_limit", "targets") if k in body}
    if not params:
        raise ValidationError(
            "validation.rate_limit", "give rate_limit and/or targets to change", field="rate_limit"
        )
    return JSONResponse(await call(request, "rules.update", {"id": ident, **params}))


@endpoint
async def retry_rule(request: Request) -> Response:
    """Bind a failed rule again now (``rules.retry``), e.g. right after the operator
    freed its port, instead of waiting for the data plane's own backoff.  Answers like
    a push: the rule once bound, ``activation_failed`` (422, with ``rule``) while the
    port is still taken, ``ack_timeout`` (504) when the client did not answer."""
    return JSONResponse(await call(request, "rules.retry", {"id": rule_id(request)}))


@endpoint
async def remove_rule(request: Request) -> Response:
    await call(request, "rules.remove", {"id": rule_id(request)})
    return Response(status_code=204)


def _stats_params(request: Request) -> dict[str, Any]:
    params: dict[str, Any] = {"id": rule_id(request)}
    for flag in ("per_port", "per_target"):
        value = query_bool(request, flag)
        if value:
            params[flag] = True
    return params


@endpoint
async def rule_stats(request: Request) -> Response:
    bearer_token(request)
    return JSONResponse(await call(request, "rules.stats", _stats_params(request)))


@endpoint
async def rule_stats_stream(request: Request) -> Response:
    """The first read happens before the stream opens, so a bad id or token is a
    plain JSON error with its status rather than an event inside a 200 stream."""
    creds = bearer_token(request)
    params = _stats_params(request)
    interval = query_number(request, "interval", sse.MIN_INTERVAL, sse.MAX_INTERVAL)
    if interval is None:
        interval = settings(request).stats_stream_interval_secs
    first = await control(request).call("rules.stats", params, **creds.rpc())
    events = sse.stats_events(
        control(request), creds.rpc(), params, float(interval), first, request.app.state.stopping
    )
    return StreamingResponse(events, media_type="text/event-stream", headers=sse.HEADERS)


routes = [
    route("/v1/rules", GET=list_rules, POST=push_rule),
    route("/v1/rules/{id}", GET=get_rule, PUT=update_rule, DELETE=remove_rule),
    route("/v1/rules/{id}/retry", POST=retry_rule),
    route("/v1/rules/{id}/stats", GET=rule_stats),
    route("/v1/rules/{id}/stats/stream", GET=rule_stats_stream),
]
