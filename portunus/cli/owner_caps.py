"""``portunus-server owner-cap set|get|list|delete``: per-owner caps on a client.

An owner's cap is one envelope over all of that owner's rules on one client
(every shard of it), checked together with each rule's own caps: the tighter
wins.  Imported lazily through ``server.LAZY_VERBS``; importing it registers the
group on ``portunus-server``.
"""

from __future__ import annotations

from typing import Any

import click

from portunus.cli import output
from portunus.cli.common import OperatorContext, echo_json, format_option, hint_vars
from portunus.cli.push_params import rate_limit_options
from portunus.errors import PortunusError


@click.group("owner-cap")
def owner_cap() -> None:
    """Per-owner caps on a client: one envelope over all of an owner's rules there.

    \b
    Examples:
      portunus-server owner-cap set local alice --bandwidth-in-bps 1250000 --concurrent-connections 50
      portunus-server owner-cap list local
      portunus-server owner-cap delete local alice
    """


def caps_text(caps: dict[str, Any] | None) -> str:
    if not caps:
        return "-"
    return " ".join(f"{k}={v}" for k, v in sorted(caps.items()))


@owner_cap.command("set")
@click.argument("client")
@click.argument("owner")
@rate_limit_options
@format_option
@click.pass_obj
def set_cap(obj: OperatorContext, client: str, owner: str, fmt: str, **caps: int | None) -> None:
    """Set OWNER's caps on CLIENT (name or id); applies to open connections at once.

    The caps replace the owner's previous ones on that client; give at least one.
    *_bps are bytes per second.
    """
    hint_vars(client=client)
    given = {k: v for k, v in caps.items() if v is not None}
    if not given:
        # Well-formed but empty: refused before anything is sent (exit 3).
        raise PortunusError(
            "preflight",
            "no caps given: pass at least one of --bandwidth-in-bps, --bandwidth-out-bps, "
            "--new-connections-per-sec, --concurrent-connections (`owner-cap delete` lifts a cap)",
        )
    result = obj.call("owner_caps.set", {"client": client, "owner": owner, "rate_limit": given})
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(
            f"owner {result['owner']} on client {result['client']}: {caps_text(result['rate_limit'])}"
        )


@owner_cap.command("get")
@click.argument("client")
@click.argument("owner")
@format_option
@click.pass_obj
def get_cap(obj: OperatorContext, client: str, owner: str, fmt: str) -> None:
    """Show OWNER's caps on CLIENT."""
    hint_vars(client=client)
    result = obj.call("owner_caps.get", {"client": client, "owner": owner})
    if fmt == "json":
        echo_json(result)
        return
    rows = [(k, v) for k, v in sorted(result["rate_limit"].items())]
    click.echo(
        f"owner {result['owner']} on client {result['client']} (updated {result['updated_at']})"
    )
    click.echo(output.table(("CAP", "VALUE"), rows))


@owner_cap.command("list")
@click.argument("client")
@format_option
@click.pass_obj
def list_caps(obj: OperatorContext, client: str, fmt: str) -> None:
    """Owners with rules or caps on CLIENT, and their caps."""
    hint_vars(client=client)
    result = obj.call("owner_caps.list", {"client": client})
    if fmt == "json":
        echo_json(result)
        return
    rows = [(o["owner"], o["rule_count"], caps_text(o.get("rate_limit"))) for o in result["owners"]]
    click.echo(output.table(("OWNER", "RULES", "CAPS"), rows))


@owner_cap.command("delete")
@click.argument("client")
@click.argument("owner")
@format_option
@click.pass_obj
def delete_cap(obj: OperatorContext, client: str, owner: str, fmt: str) -> None:
    """Lift OWNER's caps on CLIENT (the rules' own caps stay)."""
    hint_vars(client=client)
    result = obj.call("owner_caps.delete", {"client": client, "owner": owner})
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(f"owner {owner} on client {client}: caps lifted")


def _register() -> None:
    from portunus.cli.server import cli

    if "owner-cap" not in cli.commands:
        cli.add_command(owner_cap, "owner-cap")


_register()
