"""The control RPC methods of docs/rpc.md, each a thin call into the services.

``METHODS`` is the whole API surface: a method absent here does not exist
(``not_found``).  The ``Dispatcher`` authenticates and then asks
``policy.authorize`` — the one authorization decision — before any handler
runs; handlers narrow a ``user`` further to its own rules and granted clients.
Every refusal (401/403) is an audit row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from portunus.config import Settings
from portunus.control.auth import Authenticator, Principal
from portunus.control.dataplane import LOCAL, DataPlane
from portunus.control.fleet import client_pages
from portunus.control.fleet.clients import ClientService
from portunus.control.fleet.remote_link import RemoteLink
from portunus.control.owner_caps import OwnerCapService
from portunus.control.policy import PUBLIC, authorize, policy_of, require_owner
from portunus.control.rpc.protocol import Request
from portunus.control.rule_list import RULE_STATES
from portunus.control.service import RuleService, parse_rule_id
from portunus.control.sessions import SessionService, bounded
from portunus.control.stats import rule_stats
from portunus.control.store import Store, write_audit
from portunus.control.store import users as users_db
from portunus.control.store.audit import list_audit
from portunus.control.store.migrations import format_ts
from portunus.control.store.paging import decode_cursor, encode_cursor, parse_limit
from portunus.control.store.rules import count_rules_by_state, require_rule
from portunus.control.traffic import TrafficSampler
from portunus.control.traffic import query as traffic_query
from portunus.control.traffic import summary as traffic_summary
from portunus.control.users import UserService
from portunus.errors import PortunusError, ValidationError
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
    traffic: TrafficSampler | None = None
    users: UserService | None = None
    sessions: SessionService | None = None
    owner_caps: OwnerCapService | None = None
    counters: Any = None  # control/counters.py RuleCounters: totals across restarts

    def __post_init__(self) -> None:
        if self.users is None:
            self.users = UserService(self.store, self.settings, self.service)
        if self.sessions is None:
            self.sessions = SessionService(self.store, self.settings, self.auth.clock)
        if self.owner_caps is None:
            self.owner_caps = OwnerCapService(self.store, self.dataplane)

    @property
    def caps(self) -> OwnerCapService:
        assert self.owner_caps is not None
        return self.owner_caps


Handler = Callable[[ControlContext, Principal, dict[str, Any]], Awaitable[Any]]


async def health(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return {"status": "ok"}


async def whoami(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return {
        "user": who.user,
        "role": who.role,
        "token_id": who.token_id,
        "password_change_required": who.password_change_required,
    }


async def rules_push(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await ctx.service.push(who, params)


async def _own_rule(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> None:
    """A ``user`` acts on its own rules only (``not_owner``); a superadmin on all."""
    if who.is_superadmin:
        return
    rule_id = parse_rule_id(params)
    async with ctx.store.read() as db:
        stored = await require_rule(db, rule_id)
    require_owner(who, stored.rule.owner, rule_id)


async def rules_list(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    if not who.is_superadmin:
        owner = params.get("owner")
        if owner not in (None, "", who.user):
            raise PortunusError(
                "not_owner", "you may list your own rules only", owner=bounded(owner)
            )
        params = {**params, "owner": who.user}
    return await ctx.service.list_rules(params)


async def rules_counts(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    """Rules per state (a user: their own), for the dashboard without listing them all."""
    async with ctx.store.read() as db:
        by_state = await count_rules_by_state(db, None if who.is_superadmin else who.user)
    return {
        "by_state": {s: by_state.get(s, 0) for s in RULE_STATES},
        "total": sum(by_state.values()),
    }


async def rules_get(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    await _own_rule(ctx, who, params)
    return await ctx.service.get_rule(params)


async def rules_update(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    await _own_rule(ctx, who, params)
    return await ctx.service.update(who, params)


async def rules_remove(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    await _own_rule(ctx, who, params)
    return await ctx.service.remove(who, params)


async def rules_retry(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    from portunus.control.retry_rule import retry_rule

    await _own_rule(ctx, who, params)  # like rules.update: a user retries its own rules only
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
    require_owner(who, stored.rule.owner, rule_id)
    if stored.client_id != LOCAL:
        # A remote rule counts on the edge; its latest stats frame is in memory.
        if ctx.remote is None:
            raise PortunusError(
                "unavailable", "the edge gateway is not running in this control process"
            )
        live = ctx.remote.rule_stats(stored.client_id, stored.rule, per_port, per_target)
        if ctx.counters is not None:
            return ctx.counters.remote_stats(stored.client_id, rule_id, live)
        return live
    live = await asyncio.to_thread(
        rule_stats, ctx.settings.metrics_dir, stored.rule, per_port, per_target
    )
    return ctx.counters.local_stats(rule_id, live) if ctx.counters is not None else live


async def clients_list(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    """One page: ``{clients, next_cursor, total}`` (control.fleet.client_pages).  A
    ``user`` sees the clients its grants name (all for a ``*`` grant), with the
    count of its own rules on each."""
    async with ctx.store.read() as db:
        only, owner = await _client_scope(db, who)
        return await client_pages.list_page(
            db, ctx.dataplane, ctx.remote, params, only=only, owner=owner
        )


async def _client_scope(db: Any, who: Principal) -> tuple[set[str] | None, str | None]:
    """(client ids a caller may see or None for all, owner whose rules are counted)."""
    if who.is_superadmin:
        return None, None
    granted = {g.client_id for g in await users_db.list_grants(db, who.user_id)}
    return (None if "*" in granted else granted), who.user


async def clients_get(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    async with ctx.store.read() as db:
        only, owner = await _client_scope(db, who)
        return await client_pages.get_one(
            db, ctx.dataplane, params.get("id"), only=only, owner=owner
        )


def _clients(ctx: ControlContext) -> ClientService:
    if ctx.clients is None:
        raise PortunusError(
            "unavailable", "the edge gateway is not running in this control process"
        )
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
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 has no UTC time
        raise ValidationError(f"validation.{key}", f"{key}: out of range", field=key) from None
    except ValueError as exc:
        raise ValidationError(f"validation.{key}", f"{key}: {exc}", field=key) from None


async def audit_list(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    """Newest first, paged with the shared cursor codec (store.paging): the key is the
    last entry's id, so appends while paging neither repeat nor skip a row."""
    since = parse_time(params["since"], "since") if params.get("since") is not None else None
    until = parse_time(params["until"], "until") if params.get("until") is not None else None
    limit = parse_limit(params.get("limit"), AUDIT_DEFAULT_LIMIT, AUDIT_MAX_LIMIT)
    key = decode_cursor("audit", params.get("cursor"), arity=1)
    after = None if key is None else key[0]
    if after is not None and (not isinstance(after, int) or after < 0):
        raise ValidationError(
            "validation.cursor", "cursor is not a next_cursor of this audit list", field="cursor"
        )
    filters: dict[str, str] = {}
    for name in ("actor", "outcome"):
        value = params.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise ValidationError(f"validation.{name}", f"{name} must be a string", field=name)
        if value:
            filters[name] = value
    async with ctx.store.read() as db:
        entries, last_id = await list_audit(db, since, until, limit, after, **filters)
    return {
        "entries": entries,
        "next_cursor": None if last_id is None else encode_cursor("audit", [int(last_id)]),
    }


async def traffic_history(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await traffic_query(ctx.store, who, params)


async def traffic_now(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await traffic_summary(ctx.store, ctx.traffic, who, params)


async def owner_caps_list(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await ctx.caps.list_caps(params)


async def owner_caps_get(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await ctx.caps.get_cap(params)


async def owner_caps_set(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await ctx.caps.set_cap(who, params)


async def owner_caps_delete(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await ctx.caps.delete_cap(who, params)


def _users(ctx: ControlContext) -> UserService:
    assert ctx.users is not None
    return ctx.users


def _sessions(ctx: ControlContext) -> SessionService:
    assert ctx.sessions is not None
    return ctx.sessions


async def auth_login(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _sessions(ctx).login(params)


async def auth_setup(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _sessions(ctx).setup(params)


async def auth_logout(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _sessions(ctx).logout(who)


async def users_me(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _sessions(ctx).me(who)


async def users_me_password(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _sessions(ctx).change_own_password(who, params)


async def users_add(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).add(who, params)


async def users_list(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).list(who, params)


async def users_get(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).get(who, params)


async def users_remove(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).remove(who, params)


async def users_passwd(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).passwd(who, params)


async def tokens_issue(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).issue_token(who, params)


async def tokens_list(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).list_tokens(who, params)


async def tokens_revoke(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).revoke_token(who, params)


async def grants_add(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).add_grant(who, params)


async def grants_list(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).list_grants(who, params)


async def grants_revoke(ctx: ControlContext, who: Principal, params: dict[str, Any]) -> Any:
    return await _users(ctx).revoke_grant(who, params)


# method -> (needs an identity, handler).  Who may call it is policy.POLICY[method];
# the flag must agree with it (tests/unit/control/test_control_policy.py).
METHODS: dict[str, tuple[bool, Handler]] = {
    "health": (False, health),
    "auth.whoami": (True, whoami),
    "rules.push": (True, rules_push),
    "rules.list": (True, rules_list),
    "rules.counts": (True, rules_counts),
    "rules.get": (True, rules_get),
    "rules.update": (True, rules_update),
    "rules.remove": (True, rules_remove),
    "rules.retry": (True, rules_retry),
    "rules.stats": (True, rules_stats),
    "clients.list": (True, clients_list),
    "clients.get": (True, clients_get),
    "clients.enroll": (True, clients_enroll),
    "clients.rename": (True, clients_rename),
    "clients.revoke": (True, clients_revoke),
    "clients.delete": (True, clients_delete),
    "audit.list": (True, audit_list),
    "auth.login": (False, auth_login),
    "auth.setup": (False, auth_setup),
    "auth.logout": (True, auth_logout),
    "users.me": (True, users_me),
    "users.me.password": (True, users_me_password),
    "users.add": (True, users_add),
    "users.list": (True, users_list),
    "users.get": (True, users_get),
    "users.remove": (True, users_remove),
    "users.passwd": (True, users_passwd),
    "tokens.issue": (True, tokens_issue),
    "tokens.list": (True, tokens_list),
    "tokens.revoke": (True, tokens_revoke),
    "grants.add": (True, grants_add),
    "grants.list": (True, grants_list),
    "grants.revoke": (True, grants_revoke),
    "traffic.query": (True, traffic_history),
    "traffic.summary": (True, traffic_now),
    "owner_caps.list": (True, owner_caps_list),
    "owner_caps.get": (True, owner_caps_get),
    "owner_caps.set": (True, owner_caps_set),
    "owner_caps.delete": (True, owner_caps_delete),
}
_ANONYMOUS = Principal(user_id=0, user="anonymous", role="", token_id=0)


def _target(params: dict[str, Any]) -> str | None:
    """What a refused request was about, bounded for the audit row."""
    for key, kind in (
        ("id", "id"),
        ("user_id", "user"),
        ("token_id", "token"),
        ("grant_id", "grant"),
        ("client", "client"),
    ):
        if params.get(key) is not None:
            return f"{kind}:{bounded(params[key])}"
    return None


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
        _needs_identity, handler = entry
        who = _ANONYMOUS
        try:
            if policy_of(req.method) != PUBLIC:
                who = await self.ctx.auth.authenticate(req.token, req.session)
                authorize(req.method, who, req.csrf)
            return await handler(self.ctx, who, req.params)
        except PortunusError as exc:
            if exc.http_status in (401, 403) and not getattr(exc, "audited", False):
                await self._audit_denied(req, who, exc)
            raise

    async def _audit_denied(self, req: Request, who: Principal, exc: PortunusError) -> None:
        details = {
            "method": req.method,
            "token_id": who.token_id or None,
            "session": who.session_id,
            "message": bounded(exc.message, 200),
        }
        async with self.ctx.store.write() as db:
            await write_audit(
                db,
                who.user,
                f"denied.{req.method}",
                _target(req.params),
                outcome="error",
                error_code=exc.code,
                details=details,
            )
