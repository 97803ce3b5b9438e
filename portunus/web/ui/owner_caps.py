"""Owner caps (superadmin): per client, the owners with rules or caps, and a caps
form per owner (one envelope over all of that owner's rules on the client).  The
same ``owner_caps.*`` RPCs as /v1/clients/{id}/owners…; the form is checked
against the same OwnerCaps schema as the API's PUT body."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portunus.errors import PortunusError
from portunus.web.routes.bodies import validate_body
from portunus.web.routes.common import call
from portunus.web.ui import rule_form
from portunus.web.ui.base import Identity, field_errors, read_form, redirect, superadmin_page
from portunus.web.ui.client_choice import client_choice
from portunus.web.ui.render import render


async def _page(request: Request, client: str, **extra: object) -> Response:
    choice = await client_choice(request)
    owners = await call(request, "owner_caps.list", {"client": client}) if client else None
    context: dict[str, Any] = {"values": {}, "errors": {}, "error": None, "editing": None}
    context.update(extra)
    status = int(str(context.pop("status", 200)))
    return render(
        request,
        "owner_caps.html",
        status=status,
        client=client,
        choice=choice,
        owners=owners,
        caps=rule_form.CAP_FIELDS,
        notice=request.query_params.get("notice"),
        **context,
    )


@superadmin_page
async def owner_caps_page(request: Request, ident: Identity) -> Response:
    client = request.query_params.get("client", "local")
    editing = request.query_params.get("owner")
    values: dict[str, str] = {}
    if editing:
        try:
            current = await call(request, "owner_caps.get", {"client": client, "owner": editing})
            values = rule_form.form_from_caps(current.get("rate_limit"))
        except PortunusError as err:
            if err.code != "owner_cap_not_found":
                raise
    return await _page(request, client, editing=editing, values={"owner": editing or "", **values})


@superadmin_page
async def set_caps(request: Request, ident: Identity) -> Response:
    form = await read_form(request)
    client, owner = form.get("client", ""), form.get("owner", "")
    caps = rule_form.caps_from_form(form)
    try:
        # the API's PUT body is the bare caps object: the same schema, and control's own
        # `preflight` refusal for no caps at all
        body = validate_body(caps, "OwnerCaps")
        await call(
            request, "owner_caps.set", {"client": client, "owner": owner, "rate_limit": body}
        )
    except PortunusError as err:
        if err.code == "client_not_found":
            raise
        errors = {
            (k if k == "owner" else f"rate_limit.{k}"): v for k, v in field_errors(err).items()
        }
        return await _page(
            request,
            client,
            values=form,
            errors=errors,
            error=err,
            editing=owner,
            status=err.http_status,
        )
    return redirect(f"/owner-caps?client={quote(client)}&notice=set")


@superadmin_page
async def delete_caps(request: Request, ident: Identity) -> Response:
    form = await read_form(request)
    client = form.get("client", "")
    await call(request, "owner_caps.delete", {"client": client, "owner": form.get("owner", "")})
    return redirect(f"/owner-caps?client={quote(client)}&notice=deleted")


routes = [
    Route("/owner-caps", owner_caps_page, methods=["GET", "HEAD"]),
    Route("/owner-caps/set", set_caps, methods=["POST"]),
    Route("/owner-caps/delete", delete_caps, methods=["POST"]),
]
