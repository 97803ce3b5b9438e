"""The control RPC methods of docs/rpc.md, each a thin call into the services.

``METHODS`` is the whole API surface: a method absent here does not exist
(``not_found``).  Every method except ``health`` authenticates the token first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from portunus.config import Settings
from portunus.control.auth import Authenticator, Principal
from portunus.control.dataplane import LOCAL, DataPlane
from portunus.control.edge.clients import ClientService, client_entry
from portunus.control.edge.remote_link import RemoteLink
from portunus.control.rpc.protocol import Request
from portunus.control.service import RuleService, parse_rule_id
from portunus.control.stats import rule_stats
from portunus.control.store import Store, accounts
from portunus.control.store.audit import list_audit
from portunus.control.store.migrations import format_ts
from portunus.control.store.rules import count_rules_by_client, require_rule
from portunus.errors import PortunusError, ValidationError
from portunus.text import is_ascii_digits
from portunus.timefmt import parse_when

AUDIT_DEFAULT_LIMIT = 100
AUDIT_MAX_LIMIT = 1000


@dataclass(slots=True)
class ControlContext:
    """Everything a handler may use; built once by ``main.run_control``."""

    settings: Settings
    store: Store
    auth: Authenticator
    service: RuleService
    dataplane: DataPlane
    # The edge gateway's parts; None when the control process runs without it.
    remote: RemoteLink | None = None
    clients: ClientService | None = None
    counters: Any = None  # control/counters.py RuleCounters: totals across restarts


Handler = Callable[[ControlContext, Principal, dict[str, Any]], Awaitable[Any]]


async def health(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return {"status": "ok"}


async def whoami(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return {"user": who.user, "role": who.role, "token_id": who.token_id}


async def rules_push(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await ctx.service.push(who, params)


async def rules_list(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await ctx.service.list_rules(params)


async def rules_get(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await ctx.service.get_rule(params)


async def rules_update(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await ctx.service.update(who, params)


async def rules_remove(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await ctx.service.remove(who, params)


async def rules_retry(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    from portunus.control.retry_rule import retry_rule

    return await retry_rule(ctx.service, who, params)


def _flag(params: dict[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise ValidationError(f"validation.{key}", f"{key} must be true or false", field=key)
    return value


async def rules_stats(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    rule_id = parse_rule_id(params)
    per_port, per_target = _flag(params, "per_port"), _flag(params, "per_target")
    async with ctx.store.read() as db:
        stored = await require_rule(db, rule_id)
    if stored.client_id != LOCAL:
        # A remote rule counts on the edge; its latest stats frame is in memory.
        if ctx.remote is None:
            raise PortunusError("unavailable", "the edge gateway is not running in this control process")
        live = ctx.remote.rule_stats(stored.client_id, stored.rule, per_port, per_target)
        if ctx.counters is not None:
            return ctx.counters.remote_stats(stored.client_id, rule_id, live)
        return live
    live = await asyncio.to_thread(
        rule_stats, ctx.settings.metrics_dir, stored.rule, per_port, per_target
    )
    return ctx.counters.local_stats(rule_id, live) if ctx.counters is not None else live


async def clients_list(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    async with ctx.store.read() as db:
        clients = await accounts.list_clients(db)
        counts = await count_rules_by_client(db)
    out = [client_entry(c, ctx.dataplane.info(c.client_id), counts.get(c.client_id, 0))
           for c in clients]
    return {"clients": out}


def _clients(ctx: ControlContext) -> ClientService:
    if ctx.clients is None:
        raise PortunusError("unavailable", "the edge gateway is not running in this control process")
    return ctx.clients


async def clients_enroll(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _clients(ctx).enroll(who, params)


async def clients_rename(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _clients(ctx).rename(who, params)


async def clients_revoke(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _clients(ctx).revoke(who, params)


async def clients_delete(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _clients(ctx).delete(who, params)


def parse_time(value: Any, key: str) -> str:
    """An operator time (see portunus.timefmt) in the audit table's UTC format.
    The web passes since/until through untouched, so this is where they are checked."""
    try:
        return format_ts(parse_when(value))
    except ValueError as exc:
        raise ValidationError(f"validation.{key}", f"{key}: {exc}", field=key) from None


async def audit_list(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    since = parse_time(params["since"], "since") if params.get("since") is not None else None
    until = parse_time(params["until"], "until") if params.get("until") is not None else None
    limit = params.get("limit", AUDIT_DEFAULT_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= AUDIT_MAX_LIMIT:
        raise ValidationError(
            "validation.limit", f"limit must be an integer 1-{AUDIT_MAX_LIMIT}", field="limit"
        )
    cursor_raw = params.get("cursor")
    cursor: int | None = None
    if cursor_raw is not None:
        if not is_ascii_digits(str(cursor_raw)):
            raise ValidationError("validation.cursor", "cursor must be a next_cursor value", field="cursor")
        cursor = int(cursor_raw)
    async with ctx.store.read() as db:
        entries, next_cursor = await list_audit(db, since, until, limit, cursor)
    return {"entries": entries, "next_cursor": next_cursor}


# method -> (needs a token, handler)
METHODS: dict[str, tuple[bool, Handler]] = {
    "health": (False, health),
    "auth.whoami": (True, whoami),
    "rules.push": (True, rules_push),
    "rules.list": (True, rules_list),
    "rules.get": (True, rules_get),
    "rules.update": (True, rules_update),
    "rules.remove": (True, rules_remove),
    "rules.retry": (True, rules_retry),
    "rules.stats": (True, rules_stats),
    "clients.list": (True, clients_list),
    "clients.enroll": (True, clients_enroll),
    "clients.rename": (True, clients_rename),
    "clients.revoke": (True, clients_revoke),
    "clients.delete": (True, clients_delete),
    "audit.list": (True, audit_list),
}
_ANONYMOUS = Principal(user_id=0, user="anonymous", role="", token_id=0)


class Dispatcher:
    """Routes one parsed request to its handler (the ``RpcServer`` dispatch)."""

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    async def __call__(self, req: Request) -> Any:
        entry = METHODS.get(req.method)
        if entry is None:
            raise PortunusError(
                "not_found",
                f"unknown method {req.method!r}; known: {', '.join(sorted(METHODS))}",
                method=req.method,
            )
        needs_token, handler = entry
        who = await self.ctx.auth.authenticate(req.token) if needs_token else _ANONYMOUS
        return await handler(self.ctx, who, req.params)
