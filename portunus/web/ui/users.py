"""Users, grants and tokens (superadmin): create a user (a temporary password is
shown once), reset a password, grants and tokens per user, and removal with a
preview of everything the cascade takes with it.  Each write is the API's RPC."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portunus.control.store.paging import MAX_LIMIT
from portunus.errors import PortunusError
from portunus.web.routes.bodies import validate_body
from portunus.web.routes.common import call
from portunus.web.ui.base import (
    Identity,
    field_errors,
    query_dict,
    read_form,
    redirect,
    superadmin_page,
)
from portunus.web.ui.client_choice import client_choice
from portunus.web.ui.render import render


def _uid(request: Request) -> str:
    return str(request.path_params["id"])


def _int_or_text(value: str) -> int | str:
    return int(value) if value.isdigit() else value


PAGE = 100
CURSOR_MAX = 256
# previews and a user's own lists: one page of the largest size, "N of total" beyond it
DETAIL = {"limit": MAX_LIMIT}


@superadmin_page
async def list_users(request: Request, ident: Identity) -> Response:
    """One page of ``PAGE`` users by user id; the next page is the same filters plus
    the opaque ``next_cursor`` (a bad cursor is control's ``validation.cursor``)."""
    filters = query_dict(request, ("role", "name_prefix"))
    params: dict[str, Any] = {**filters, "limit": PAGE}
    cursor = request.query_params.get("cursor", "")
    if cursor and len(cursor) <= CURSOR_MAX:  # opaque (store.paging); control checks it
        params["cursor"] = cursor
    users = await call(request, "users.list", params)
    return render(
        request,
        "users.html",
        users=users["users"],
        total=users["total"],
        next_cursor=users["next_cursor"],
        paged="cursor" in params,
        filters=filters,
        query=urlencode(filters),
        notice=request.query_params.get("notice"),
    )


@superadmin_page
async def new_user(request: Request, ident: Identity) -> Response:
    return render(request, "user_new.html", values={"role": "user"}, errors={}, error=None)


@superadmin_page
async def add_user(request: Request, ident: Identity) -> Response:
    form = await read_form(request)
    body: dict[str, Any] = {
        k: form[k] for k in ("user_id", "display_name", "role", "password") if form.get(k)
    }
    try:
        created = await call(request, "users.add", validate_body(body, "UserBody"))
    except PortunusError as err:
        return render(
            request,
            "user_new.html",
            status=err.http_status,
            values=form,
            errors=field_errors(err),
            error=err,
        )
    return render(
        request,
        "user_created.html",
        status=201,
        user=created,
        secret=created.get("temporary_password"),
        what="created",
    )


async def _user_view(request: Request, **extra: Any) -> Response:
    uid = _uid(request)
    user, grants, tokens, choice = await asyncio.gather(
        call(request, "users.get", {"user_id": uid}),
        call(request, "grants.list", {"user_id": uid, **DETAIL}),
        call(request, "tokens.list", {"user_id": uid, **DETAIL}),
        client_choice(request, first=(("*", "* (every client)"),)),
    )
    context: dict[str, Any] = {
        "values": {"protocols": "tcp"},
        "errors": {},
        "error": None,
        "issued": None,
        "notice": request.query_params.get("notice"),
    }
    context.update(extra)
    return render(
        request,
        "user_detail.html",
        status=context.pop("status", 200),
        user=user,
        grants=grants["grants"],
        tokens=tokens["tokens"],
        choice=choice,
        **context,
    )


@superadmin_page
async def show_user(request: Request, ident: Identity) -> Response:
    return await _user_view(request)


@superadmin_page
async def reset_password(request: Request, ident: Identity) -> Response:
    answer = await call(request, "users.passwd", {"user_id": _uid(request)})
    return render(
        request,
        "user_created.html",
        user=answer,
        secret=answer.get("temporary_password"),
        what="password reset",
    )


@superadmin_page
async def add_grant(request: Request, ident: Identity) -> Response:
    form = await read_form(request)
    ports = form.get("ports", "")
    lo, _, hi = ports.partition("-")
    body: dict[str, Any] = {
        "user_id": _uid(request),
        "client": form.get("client", ""),
        "listen_port_start": _int_or_text(lo.strip()),
        "listen_port_end": _int_or_text((hi or lo).strip()),
        "protocols": [p for p in form.get("protocols", "tcp").split(",") if p],
    }
    if form.get("note"):
        body["note"] = form["note"]
    try:
        await call(request, "grants.add", validate_body(body, "GrantBody"))
    except PortunusError as err:
        if err.http_status == 404 and err.code == "user_not_found":
            raise
        errors = {
            ("ports" if k.startswith("listen_port") else k): v for k, v in field_errors(err).items()
        }
        return await _user_view(
            request, values=form, errors=errors, error=err, status=err.http_status
        )
    return redirect(f"/users/{_uid(request)}?notice=grant")


def _inside(rule: dict[str, Any], grant: dict[str, Any]) -> bool:
    lo = rule.get("listen_port", rule.get("listen_port_start", 0))
    hi = rule.get("listen_port", rule.get("listen_port_end", 0))
    on_client = grant.get("client_id") in ("*", rule.get("client_id"))
    return (
        on_client
        and rule.get("protocol") in grant.get("protocols", [])
        and (grant["listen_port_start"] <= lo and hi <= grant["listen_port_end"])
    )


@superadmin_page
async def confirm_revoke_grant(request: Request, ident: Identity) -> Response:
    """Preview: the user's rules inside this grant.  Control removes those of them that
    no remaining grant covers; the page lists them all as at risk and says so."""
    uid, gid = _uid(request), str(request.path_params["gid"])
    grants, rules = await asyncio.gather(
        call(request, "grants.list", {"user_id": uid, **DETAIL}),
        call(request, "rules.list", {"owner": uid, **DETAIL}),
    )
    grant = next((g for g in grants["grants"] if str(g["grant_id"]) == gid), None)
    if grant is None:
        raise PortunusError("grant_not_found", f"user {uid} has no grant {gid}", grant_id=gid)
    inside = [r for r in rules["rules"] if _inside(r, grant)]
    return render(
        request,
        "grant_revoke.html",
        user_id=uid,
        grant=grant,
        rules=inside,
        others=len(grants["grants"]) - 1,
    )


@superadmin_page
async def revoke_grant(request: Request, ident: Identity) -> Response:
    answer = await call(
        request, "grants.revoke", {"grant_id": _int_or_text(str(request.path_params["gid"]))}
    )
    removed = ",".join(str(i) for i in answer.get("removed_rule_ids", []))
    return redirect(f"/users/{_uid(request)}?notice=grant-revoked&removed={removed}")


@superadmin_page
async def issue_token(request: Request, ident: Identity) -> Response:
    form = await read_form(request)
    body = {"name": form["name"]} if form.get("name") else {}
    try:
        issued = await call(
            request, "tokens.issue", {**validate_body(body, "TokenBody"), "user_id": _uid(request)}
        )
    except PortunusError as err:
        if err.http_status == 404:
            raise
        return await _user_view(
            request, errors=field_errors(err), error=err, status=err.http_status
        )
    return await _user_view(request, issued=issued, status=201)


@superadmin_page
async def revoke_token(request: Request, ident: Identity) -> Response:
    await call(
        request, "tokens.revoke", {"token_id": _int_or_text(str(request.path_params["tid"]))}
    )
    return redirect(f"/users/{_uid(request)}?notice=token-revoked")


@superadmin_page
async def confirm_remove(request: Request, ident: Identity) -> Response:
    """The preview lists what users.remove will take: the user's rules, grants and tokens."""
    uid = _uid(request)
    user, rules, grants, tokens = await asyncio.gather(
        call(request, "users.get", {"user_id": uid}),
        call(request, "rules.list", {"owner": uid, **DETAIL}),
        call(request, "grants.list", {"user_id": uid, **DETAIL}),
        call(request, "tokens.list", {"user_id": uid, **DETAIL}),
    )
    live_tokens = [t for t in tokens["tokens"] if not t.get("revoked_at")]
    return render(
        request,
        "user_remove.html",
        user=user,
        rules=rules["rules"],
        rules_total=rules.get("total", len(rules["rules"])),
        grants=grants["grants"],
        tokens=live_tokens,
    )


@superadmin_page
async def remove_user(request: Request, ident: Identity) -> Response:
    answer = await call(request, "users.remove", {"user_id": _uid(request)})
    return render(request, "user_removed.html", answer=answer)


routes = [
    Route("/users", list_users, methods=["GET", "HEAD"]),
    Route("/users/new", new_user, methods=["GET", "HEAD"]),
    Route("/users/new", add_user, methods=["POST"]),
    Route("/users/{id}", show_user, methods=["GET", "HEAD"]),
    Route("/users/{id}/password", reset_password, methods=["POST"]),
    Route("/users/{id}/grants", add_grant, methods=["POST"]),
    Route("/users/{id}/grants/{gid}/revoke", confirm_revoke_grant, methods=["GET", "HEAD"]),
    Route("/users/{id}/grants/{gid}/revoke", revoke_grant, methods=["POST"]),
    Route("/users/{id}/tokens", issue_token, methods=["POST"]),
    Route("/users/{id}/tokens/{tid}/revoke", revoke_token, methods=["POST"]),
    Route("/users/{id}/remove", confirm_remove, methods=["GET", "HEAD"]),
    Route("/users/{id}/remove", remove_user, methods=["POST"]),
]
