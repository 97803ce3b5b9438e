"""Client pages: the paged list with connection state (filters: connected/offline,
name prefix; ``clients.list`` pages by an opaque cursor), enrollment (the one-time command
shown once, with a copy button), rename, revoke and delete.  Enrollment, rename,
revoke and delete are superadmin operations; the control process enforces that,
and the pages follow its answer."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portunus.errors import PortunusError
from portunus.web.routes.bodies import validate_body
from portunus.web.routes.common import call
from portunus.web.ui.base import Identity, field_errors, page, read_form, redirect, superadmin_page
from portunus.web.ui.render import render

PAGE = 100
CURSOR_MAX = 256


def _ref(request: Request) -> str:
    return str(request.path_params["id"])


async def _find(request: Request) -> dict[str, Any]:
    """One client by id or name: control answers ``client_not_found`` (also for a
    client outside a user's grants)."""
    return dict(await call(request, "clients.get", {"id": _ref(request)}))


def _list_filters(request: Request) -> tuple[dict[str, str], dict[str, Any]]:
    """The filters as kept in the query string, and as ``clients.list`` params.
    ``connected`` is ``true``/``false`` or absent; anything else is ignored."""
    shown: dict[str, str] = {}
    params: dict[str, Any] = {}
    connected = request.query_params.get("connected", "")
    if connected in ("true", "false"):
        shown["connected"] = connected
        params["connected"] = connected == "true"
    prefix = request.query_params.get("name_prefix", "").strip()
    if prefix:
        shown["name_prefix"] = prefix
        params["name_prefix"] = prefix  # control checks its length (validation.name_prefix)
    return shown, params


@page
async def list_clients(request: Request, ident: Identity) -> Response:
    """One page of ``PAGE`` clients; the next page is the same filters plus the
    opaque ``next_cursor`` (a bad cursor is control's ``validation.cursor``)."""
    filters, params = _list_filters(request)
    params["limit"] = PAGE
    cursor = request.query_params.get("cursor", "")
    if cursor and len(cursor) <= CURSOR_MAX:  # opaque (store.paging); control checks it
        params["cursor"] = cursor
    result = await call(request, "clients.list", params)
    return render(
        request,
        "clients.html",
        clients=result["clients"],
        total=result["total"],
        next_cursor=result["next_cursor"],
        paged="cursor" in params,
        filters=filters,
        query=urlencode(filters),
        notice=request.query_params.get("notice"),
    )


def _enroll_body(form: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {"name": form.get("name", "")}
    if form.get("address"):
        body["address"] = form["address"]
    if form.get("ttl_secs"):
        ttl = form["ttl_secs"]
        body["ttl_secs"] = int(ttl) if ttl.isdigit() else ttl
    return body


@superadmin_page
async def enroll_form(request: Request, ident: Identity) -> Response:
    return render(request, "client_enroll.html", values={"ttl_secs": "600"}, errors={}, error=None)


@superadmin_page
async def enroll(request: Request, ident: Identity) -> Response:
    form = await read_form(request)
    try:
        enrollment = await call(
            request, "clients.enroll", validate_body(_enroll_body(form), "ClientEnrollmentBody")
        )
    except PortunusError as err:
        return render(
            request,
            "client_enroll.html",
            status=err.http_status,
            values=form,
            errors=field_errors(err),
            error=err,
        )
    # The one-time code is in the command: this answer is shown once and never cached.
    return render(request, "client_enrolled.html", status=201, enrollment=enrollment)


@page
async def show_client(request: Request, ident: Identity) -> Response:
    client = await _find(request)
    return render(
        request,
        "client_detail.html",
        client=client,
        values={"name": client["client_name"]},
        errors={},
        error=None,
        notice=request.query_params.get("notice"),
    )


@superadmin_page
async def rename(request: Request, ident: Identity) -> Response:
    form = await read_form(request)
    try:
        body = validate_body({"name": form.get("name", "")}, "ClientRename")
        await call(request, "clients.rename", {"id": _ref(request), "name": body["name"]})
    except PortunusError as err:
        if err.http_status == 404:
            raise
        client = await _find(request)
        return render(
            request,
            "client_detail.html",
            status=err.http_status,
            client=client,
            values=form,
            errors=field_errors(err),
            error=err,
            notice=None,
        )
    return redirect(f"/clients/{_ref(request)}?notice=renamed")


@superadmin_page
async def confirm(request: Request, ident: Identity) -> Response:
    action = "revoke" if request.url.path.endswith("/revoke") else "delete"
    return render(request, "client_confirm.html", action=action, ref=_ref(request))


@superadmin_page
async def revoke(request: Request, ident: Identity) -> Response:
    revoked = await call(request, "clients.revoke", {"id": _ref(request)})
    return render(request, "client_revoked.html", client=revoked)


@superadmin_page
async def delete(request: Request, ident: Identity) -> Response:
    await call(request, "clients.delete", {"id": _ref(request)})
    return redirect("/clients?notice=deleted")


routes = [
    Route("/clients", list_clients, methods=["GET", "HEAD"]),
    Route("/clients/enroll", enroll_form, methods=["GET", "HEAD"]),
    Route("/clients/enroll", enroll, methods=["POST"]),
    Route("/clients/{id}", show_client, methods=["GET", "HEAD"]),
    Route("/clients/{id}/rename", rename, methods=["POST"]),
    Route("/clients/{id}/revoke", confirm, methods=["GET", "HEAD"]),
    Route("/clients/{id}/revoke", revoke, methods=["POST"]),
    Route("/clients/{id}/delete", confirm, methods=["GET", "HEAD"]),
    Route("/clients/{id}/delete", delete, methods=["POST"]),
]
