"""``portunus-server`` verbs for edge clients: enroll-client, revoke, rename-client,
delete-client (``list-clients`` lives with the other listing verbs in server.py).

Imported lazily through ``server.LAZY_VERBS``; importing it registers the verbs
on the ``portunus-server`` group.
"""

from __future__ import annotations

from typing import Any

import click

from portunus.bounds import ENROLL_TTL
from portunus.cli.common import OperatorContext, echo_json, format_option, hint_vars
from portunus.cli.numbers import BoundedNumber


@click.command("enroll-client")
@click.argument("name")
@click.option(
    "--address",
    metavar="HOST",
    help="Host the client dials (default: the host of control_listen, else this machine's FQDN).",
)
@click.option(
    "--ttl-secs",
    type=BoundedNumber(ENROLL_TTL),
    default=600,
    show_default=True,
    help="How long the one-time code stays valid.",
)
@format_option
@click.pass_obj
def enroll_client(
    obj: OperatorContext, name: str, address: str | None, ttl_secs: int, fmt: str
) -> None:
    """Enroll a new edge client NAME; print the command to run on it.

    The command carries a one-time code (valid --ttl-secs) and the fingerprint of
    this server's certificate, which the client pins.

    \b
    Example:
      portunus-server enroll-client edge-01 --address 203.0.113.7
      # → portunus-client enroll 'portunus://203.0.113.7:7443/enroll?code=…&fp=sha256:…'
    """
    params: dict[str, Any] = {"name": name, "ttl_secs": ttl_secs}
    if address is not None:
        params["address"] = address
    result = obj.call("clients.enroll", params)
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(result["command"])


@click.command("revoke")
@click.argument("client", metavar="ID")
@format_option
@click.pass_obj
def revoke(obj: OperatorContext, client: str, fmt: str) -> None:
    """Revoke client ID (or name): disconnect it now and refuse its token.

    Its rules stay stored until `delete-client ID` removes the client.

    \b
    Example:
      portunus-server revoke 01HZX3V6Q8K2M4N5P7R9S1T3W5
    """
    hint_vars(client=client)
    result = obj.call("clients.revoke", {"id": client})
    if fmt == "json":
        echo_json(result)
        return
    how = "its session was closed" if result.get("disconnected") else "it was not connected"
    click.echo(f"client {result.get('client_name')} ({result.get('client_id')}) revoked; {how}")


@click.command("rename-client")
@click.argument("client", metavar="ID")
@click.option("--name", required=True, help="The new name (free-form; `local` is reserved).")
@format_option
@click.pass_obj
def rename_client(obj: OperatorContext, client: str, name: str, fmt: str) -> None:
    """Rename client ID (or current name); its id, rules and live session stay.

    \b
    Example:
      portunus-server rename-client 01HZX3V6Q8K2M4N5P7R9S1T3W5 --name edge-paris
    """
    hint_vars(client=client)
    result = obj.call("clients.rename", {"id": client, "name": name})
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(f"client {result.get('client_id')} renamed to {result.get('client_name')}")


@click.command("delete-client")
@click.argument("client", metavar="ID")
@format_option
@click.pass_obj
def delete_client(obj: OperatorContext, client: str, fmt: str) -> None:
    """Delete a revoked client ID and all its rules.

    \b
    Example:
      portunus-server delete-client 01HZX3V6Q8K2M4N5P7R9S1T3W5
    """
    hint_vars(client=client)
    result = obj.call("clients.delete", {"id": client})
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(f"client {client} deleted with its rules")


VERBS = {c.name: c for c in (enroll_client, revoke, rename_client, delete_client)}


def _register() -> None:
    from portunus.cli.server import cli

    for name, command in VERBS.items():
        if name not in cli.commands:
            cli.add_command(command, name)


_register()
