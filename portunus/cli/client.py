"""``portunus-client``: the edge client (enrollment and the server link arrive with issue 6)."""

from __future__ import annotations

import sys

import click

from portunus import __version__


@click.group(invoke_without_command=True)
@click.version_option(__version__, prog_name="portunus-client")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Run a Portunus edge client (not available in this release)."""
    if ctx.invoked_subcommand is None:
        click.echo("portunus-client: remote edge clients arrive in a later release; "
                   "use portunus-standalone for a single host", err=True)
        sys.exit(1)
