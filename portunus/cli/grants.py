"""``portunus-server`` verbs for what a user may do (docs/users.md): API tokens
(token-issue, token-list, token-revoke) and grants of client ports (grant-add,
grant-list, grant-revoke).  The users themselves are in ``portunus.cli.users``.

Imported lazily through ``server.LAZY_VERBS``; importing it registers the verbs
on the ``portunus-server`` group.  A token is printed once, at issue; the
server keeps only its hash.
"""

from __future__ import annotations

from typing import Any

import click

from portunus.cli import output, paging
from portunus.cli.common import OperatorContext, echo_json, format_option, hint_vars
from portunus.errors import PortunusError


def parse_ports(text: str) -> tuple[int, int]:
    lo_text, _, hi_text = text.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if hi_text else lo
    except ValueError:
        raise PortunusError(
            "validation.port_range", f"--ports must be PORT or LO-HI, got {text!r}", field="ports"
        ) from None
    return lo, hi


@click.command("token-issue")
@click.argument("user_id", metavar="USER")
@click.option("--name", help="A label for the token (1-64 characters).")
@format_option
@click.pass_obj
def token_issue(obj: OperatorContext, user_id: str, name: str | None, fmt: str) -> None:
    """Issue an API token acting as USER; printed once (only its hash is kept).

    \b
    Example:
      portunus-server token-issue alice --name ci > alice.token
    """
    params: dict[str, Any] = {"user_id": user_id}
    if name is not None:
        params["name"] = name
    result = obj.call("tokens.issue", params)
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(result["token"])
        click.echo(
            f"token {result['token_id']} for {result['user_id']}: shown once, store it now",
            err=True,
        )


@click.command("token-list")
@click.option("--user", "user_id", metavar="USER", help="Only this user's tokens.")
@paging.limit_option
@paging.cursor_option
@paging.all_option
@format_option
@click.pass_obj
def token_list(
    obj: OperatorContext,
    user_id: str | None,
    limit: int | None,
    cursor: str | None,
    every: bool,
    fmt: str,
) -> None:
    """List API tokens (never the tokens themselves), by id: one page, or all with --all.

    \b
    Example:
      portunus-server token-list --user alice
    """
    params = {"user_id": user_id} if user_id else {}
    result = paging.fetch(obj.call, "tokens.list", params, "tokens", limit, cursor, every)
    headers = ("ID", "USER", "NAME", "CREATED", "LAST USED", "REVOKED")
    paging.show(result, "tokens", fmt, paging.table_or(headers, _token_row, "no tokens"))


def _token_row(t: dict[str, Any]) -> tuple[Any, ...]:
    fields = ("token_id", "user_id", "name", "created_at", "last_used_at", "revoked_at")
    return tuple(t.get(k) for k in fields)


@click.command("token-revoke")
@click.argument("token_id", metavar="TOKEN_ID", type=int)
@format_option
@click.pass_obj
def token_revoke(obj: OperatorContext, token_id: int, fmt: str) -> None:
    """Revoke an API token; it fails from the next request on.

    \b
    Example:
      portunus-server token-revoke 7
    """
    result = obj.call("tokens.revoke", {"token_id": token_id})
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(f"token {result['token_id']} of {result['user_id']} revoked")


@click.command("grant-add")
@click.argument("user_id", metavar="USER")
@click.option("--client", required=True, help="Client name or id, or '*' for every client.")
@click.option("--ports", required=True, metavar="LO[-HI]", help="Listen ports the user may use.")
@click.option("--protocols", default="tcp", show_default=True, metavar="tcp,udp")
@click.option("--note", help="Free text (at most 256 characters).")
@format_option
@click.pass_obj
def grant_add(
    obj: OperatorContext,
    user_id: str,
    client: str,
    ports: str,
    protocols: str,
    note: str | None,
    fmt: str,
) -> None:
    """Let USER push rules on CLIENT, PROTOCOLS and listen ports LO-HI.

    \b
    Example:
      portunus-server grant-add alice --client edge-01 --ports 30000-30099 --protocols tcp,udp
    """
    hint_vars(client=client)
    lo, hi = parse_ports(ports)
    params: dict[str, Any] = {
        "user_id": user_id,
        "client": client,
        "listen_port_start": lo,
        "listen_port_end": hi,
        "protocols": [p.strip() for p in protocols.split(",")],
    }
    if note is not None:
        params["note"] = note
    result = obj.call("grants.add", params)
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(f"grant {result['grant_id']}: {_grant_text(result)}")


def _span(g: dict[str, Any]) -> str:
    lo, hi = g.get("listen_port_start"), g.get("listen_port_end")
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _grant_text(g: dict[str, Any]) -> str:
    return f"{g.get('user_id')} may use {','.join(g.get('protocols', []))} ports {_span(g)} on {g.get('client')}"


@click.command("grant-list")
@click.option("--user", "user_id", metavar="USER", help="Only this user's grants.")
@click.option(
    "--client", help="Only grants naming this client (name or id; '*': the every-client grants)."
)
@paging.limit_option
@paging.cursor_option
@paging.all_option
@format_option
@click.pass_obj
def grant_list(
    obj: OperatorContext,
    user_id: str | None,
    client: str | None,
    limit: int | None,
    cursor: str | None,
    every: bool,
    fmt: str,
) -> None:
    """List grants, by id: one page, or every one with --all.

    \b
    Example:
      portunus-server grant-list --user alice
    """
    params = {k: v for k, v in (("user_id", user_id), ("client", client)) if v}
    result = paging.fetch(obj.call, "grants.list", params, "grants", limit, cursor, every)
    headers = ("ID", "USER", "CLIENT", "PROTOCOLS", "PORTS", "NOTE")
    paging.show(result, "grants", fmt, paging.table_or(headers, _grant_row, "no grants"))


def _grant_row(g: dict[str, Any]) -> tuple[Any, ...]:
    protocols = ",".join(g.get("protocols", []))
    return (
        g.get("grant_id"),
        g.get("user_id"),
        g.get("client"),
        protocols,
        _span(g),
        g.get("note"),
    )


@click.command("grant-revoke")
@click.argument("grant_id", metavar="ID", type=int)
@format_option
@click.pass_obj
def grant_revoke(obj: OperatorContext, grant_id: int, fmt: str) -> None:
    """Revoke grant ID; the user's rules no remaining grant covers are removed (drained).

    \b
    Example:
      portunus-server grant-revoke 3
    """
    result = obj.call("grants.revoke", {"grant_id": grant_id})
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(
            f"grant {result['grant_id']} revoked; rules removed: {output.id_list(result['removed_rule_ids'])}"
        )


VERBS = {
    c.name: c for c in (token_issue, token_list, token_revoke, grant_add, grant_list, grant_revoke)
}


def _register() -> None:
    from portunus.cli.server import cli

    for name, command in VERBS.items():
        if name not in cli.commands:
            cli.add_command(command, name)


_register()
