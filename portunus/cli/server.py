"""``portunus-server``: the operator's CLI.

Every verb except ``serve``, ``gen-token`` and ``bootstrap-superadmin`` is a thin
client of the control socket (docs/rpc.md): it turns arguments into the same body
the HTTP API takes, sends one request with the operator token, and prints the
result as a table (``--format text``) or verbatim (``--format json``).  Failures
surface as ``error: <code>: <message>`` plus a hint, with the contract's exit code
(see ``portunus.cli.common``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import secrets
from typing import Any

import click

from portunus import __version__
from portunus.bounds import ACK_TIMEOUT, HEALTH_CHECK_INTERVAL, IDLE_TIMEOUT, RULE_ID
from portunus.cli import output, paging
from portunus.cli.common import (
    PROG,
    OperatorContext,
    ReportingGroup,
    WhenType,
    call_rule_and_echo,
    echo_json,
    format_option,
    hint_vars,
)
from portunus.cli.numbers import BoundedNumber
from portunus.cli.push_params import build_push_params, rate_limit_options
from portunus.config import SYSTEM_DATA_DIR
from portunus.schema.rule import MAX_TARGETS
from portunus.schema.types import PROTOCOLS, PROXY_VERSIONS

# Verbs that live in their own module and are imported only when used or listed,
# so `list-rules` does not pay for importing the whole appliance.
# A module either has an attribute named like the verb or registers it on ``cli``
# when imported (portunus.cli.fleet).
LAZY_VERBS = {
    "serve": "portunus.cli.serve",
    **dict.fromkeys(("backup", "restore", "reset"), "portunus.cli.storage"),
}
# portunus.cli.fleet registers these verbs on the group when it is imported.
LAZY_VERBS.update(
    dict.fromkeys(
        ("enroll-client", "revoke", "rename-client", "delete-client"), "portunus.cli.fleet"
    )
)
LAZY_VERBS.update(
    dict.fromkeys(
        (
            "user-add",
            "user-list",
            "user-remove",
            "user-passwd",
        ),
        "portunus.cli.users",
    )
)
LAZY_VERBS.update(
    dict.fromkeys(
        (
            "token-issue",
            "token-list",
            "token-revoke",
            "grant-add",
            "grant-list",
            "grant-revoke",
        ),
        "portunus.cli.grants",
    )
)
LAZY_VERBS["owner-cap"] = "portunus.cli.owner_caps"
LAZY_VERBS["check-config"] = "portunus.cli.check_config"  # registers itself, like clients
LAZY_VERBS.update(dict.fromkeys(("retry-rule", "update-rule"), "portunus.cli.rule_ops"))

# Extra seconds the socket waits beyond --ack-timeout, so the server's own
# ack_timeout error (with the pending rule) arrives before the CLI gives up.
ACK_SOCKET_SLACK = 10.0

EPILOG = """\b
Examples:
  portunus-server --data-dir ./var serve        # run from a checkout, no root
  portunus-server push-rule local 18080 127.0.0.1:8080
  portunus-server list-rules --format json
\b
Token (for verbs that talk to a running server), first found wins:
  $PORTUNUS_OPERATOR_TOKEN, --token-file FILE, <data-dir>/operator.token,
  /etc/portunus/operator.token. The first `serve` writes <data-dir>/operator.token.
\b
Exit codes: 0 ok, 1 other error, 2 usage/validation, 3 pre-flight,
4 unauthenticated, 5 not found, 6 activation failed, 7 ack timeout,
8 client not connected, 9 forbidden, 10 conflict.
"""


class ServerGroup(ReportingGroup):
    """Adds the lazily imported verbs of ``LAZY_VERBS`` to the listing and lookup."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self.commands)
        names.update(
            n for n, mod in LAZY_VERBS.items() if importlib.util.find_spec(mod) is not None
        )
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in LAZY_VERBS:
            try:
                module = importlib.import_module(LAZY_VERBS[cmd_name])
            except ModuleNotFoundError as exc:
                if exc.name != LAZY_VERBS[cmd_name]:
                    raise
                return None
            cmd = getattr(module, cmd_name, None)
            if cmd_name not in self.commands and isinstance(cmd, click.Command):
                self.add_command(cmd, cmd_name)
        return self.commands.get(cmd_name)


@click.group(
    cls=ServerGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]}
)
# readable=False: a user outside group portunus cannot list /var/lib/portunus; that is
# "no token you may read" (exit 4, said by resolve_token), not a usage error.
@click.option(
    "--data-dir",
    envvar="PORTUNUS_DATA_DIR",
    default=SYSTEM_DATA_DIR,
    show_default=True,
    show_envvar=True,
    type=click.Path(file_okay=False, readable=False),
    help="State directory (state.db, operator.token, TLS key).",
)
@click.option(
    "--config",
    envvar="PORTUNUS_CONFIG",
    default=None,
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="server.toml (default: <data-dir>/server.toml, then /etc/portunus/server.toml).",
)
@click.option(
    "--socket",
    envvar="PORTUNUS_SOCKET",
    default=None,
    show_envvar=True,
    metavar="PATH",
    help="Control socket (default: <runtime-dir>/control.sock; the runtime dir is "
    "$PORTUNUS_RUNTIME_DIR, /run/portunus for the system data dir, else <data-dir>/run).",
)
@click.option(
    "--token-file",
    envvar="PORTUNUS_TOKEN_FILE",
    default=None,
    show_envvar=True,
    type=click.Path(dir_okay=False),
    help="File holding the operator token (used when $PORTUNUS_OPERATOR_TOKEN is unset).",
)
@click.version_option(__version__, prog_name=PROG)
@click.pass_context
def cli(
    ctx: click.Context,
    data_dir: str,
    config: str | None,
    socket: str | None,
    token_file: str | None,
) -> None:
    """Run and steer a Portunus port-forwarding server.

    Global options go before the verb; --format goes after it.
    """
    ctx.obj = OperatorContext(
        data_dir=os.path.abspath(data_dir), config=config, socket=socket, token_file=token_file
    )


# ------------------------------------------------------------------ tokens


@cli.command("gen-token")
@format_option
def gen_token(fmt: str) -> None:
    """Print a fresh random token (32 bytes, URL-safe).

    Use it as `operator_token` in server.toml, or anywhere a shared secret is needed.

    \b
    Example:
      echo "operator_token = \\"$(portunus-server gen-token)\\"" >> server.toml
    """
    token = secrets.token_urlsafe(32)
    if fmt == "json":
        echo_json({"token": token})
    else:
        click.echo(token)


@cli.command("bootstrap-superadmin")
@click.option("--name", required=True, help="User name of the new superadmin (must not exist yet).")
@format_option
@click.pass_obj
def bootstrap_superadmin(obj: OperatorContext, name: str, fmt: str) -> None:
    """Create a superadmin user and print its API token, once.

    Writes state.db in --data-dir directly, so it works with or without a running
    server. Only the token goes to stdout; an existing NAME is refused (exit 10).

    \b
    Example:
      portunus-server --data-dir ./var bootstrap-superadmin --name alice > alice.token
    """
    from portunus.control.store import bootstrap_superadmin as mint

    token = mint(obj.db_path, name)
    if fmt == "json":
        echo_json({"name": name, "role": "superadmin", "token": token})
    else:
        click.echo(token)


# ------------------------------------------------------------------ rules


@cli.command("push-rule")
@click.argument("client")
@click.argument("listen")
@click.argument("target", required=False)
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="tcp", show_default=True)
@click.option(
    "--target",
    "extra_targets",
    multiple=True,
    metavar="HOST:PORT@PRIO",
    help=f"Another target with its priority (1 = first choice); repeat, up to {MAX_TARGETS}.",
)
@click.option(
    "--sni", metavar="PATTERN", help="Route by TLS SNI: exact name or *.domain (TCP, one port)."
)
@click.option(
    "--proxy-protocol", type=click.Choice(PROXY_VERSIONS), help="Send a PROXY header to targets."
)
@click.option("--prefer-ipv6", is_flag=True, help="Try AAAA records of DNS targets first.")
@rate_limit_options
@click.option(
    "--health-check-interval-secs",
    type=BoundedNumber(HEALTH_CHECK_INTERVAL),
    default=None,
    help="How often a failed target is re-tried (server default 5).",
)
@click.option(
    "--ack-timeout",
    type=BoundedNumber(ACK_TIMEOUT),
    default=2.0,
    show_default=True,
    metavar="SECS",
    help="How long to wait for the data plane to confirm.",
)
@click.option(
    "--owner",
    metavar="USER",
    help="Superadmin only: push for USER (checked against USER's grants).",
)
@click.option(
    "--idle-timeout",
    "idle_timeout",
    type=BoundedNumber(IDLE_TIMEOUT),
    default=None,
    metavar="SECS",
    help="Close a connection (UDP: flow) idle this long (default: never).",
)
@format_option
@click.pass_obj
def push_rule(
    obj: OperatorContext,
    client: str,
    listen: str,
    target: str | None,
    extra_targets: tuple[str, ...],
    protocol: str,
    sni: str | None,
    proxy_protocol: str | None,
    prefer_ipv6: bool,
    health_check_interval_secs: float | None,
    ack_timeout: float,
    owner: str | None,
    fmt: str,
    idle_timeout: float | None = None,
    **caps: int | None,
) -> None:
    """Forward LISTEN on CLIENT to TARGET; wait until it is active.

    CLIENT is a client name or id (`local` = this server). LISTEN is PORT or LO-HI;
    TARGET is host:port, or host:LO-HI of the same length for a range.

    \b
    Examples:
      portunus-server push-rule local 18080 127.0.0.1:8080
      portunus-server push-rule edge-01 30000-30050 upstream.local:30000-30050 --protocol udp
      portunus-server push-rule edge-01 443 api.internal:8443 --sni api.example.com
      portunus-server push-rule edge-01 8080 --target a.internal:80@1 --target b.internal:80@2
    """
    hint_vars(client=client)
    params = build_push_params(
        client=client,
        listen=listen,
        target=target,
        targets=extra_targets,
        protocol=protocol,
        sni=sni,
        proxy_protocol=proxy_protocol,
        prefer_ipv6=prefer_ipv6,
        rate_limit=caps,
        health_check_interval_secs=health_check_interval_secs,
        ack_timeout=ack_timeout,
        idle_timeout_secs=idle_timeout,
    )
    if owner is not None:
        params["owner"] = owner
    call_rule_and_echo(obj, "rules.push", params, fmt, timeout=ack_timeout + ACK_SOCKET_SLACK)


@cli.command("list-rules")
@click.option("--client", help="Only rules of this client (name or id).")
@click.option("--owner", help="Only rules owned by this user.")
@click.option(
    "--state",
    type=click.Choice(["pending", "active", "failed", "draining", "revoked"]),
    help="Only rules in this state.",
)
@click.option("--protocol", type=click.Choice(["tcp", "udp"]), help="Only this protocol.")
@paging.limit_option
@paging.cursor_option
@paging.all_option
@format_option
@click.pass_obj
def list_rules(
    obj: OperatorContext,
    client: str | None,
    owner: str | None,
    state: str | None,
    protocol: str | None,
    limit: int | None,
    cursor: str | None,
    every: bool,
    fmt: str,
) -> None:
    """List rules with their state, ordered by id: one page, or every one with --all.

    \b
    Examples:
      portunus-server list-rules --client edge-01
      portunus-server list-rules --state failed --all --format json
    """
    params = {
        k: v
        for k, v in (("client", client), ("owner", owner), ("state", state), ("protocol", protocol))
        if v is not None
    }
    result = paging.fetch(obj.call, "rules.list", params, "rules", limit, cursor, every)
    paging.show(result, "rules", fmt, output.rules_table)


@cli.command("rule-stats")
@click.argument("rule_id", metavar="ID", type=BoundedNumber(RULE_ID))
@click.option("--per-port", is_flag=True, help="Add a row per listen port (range rules).")
@click.option("--per-target", is_flag=True, help="Add a row per target.")
@format_option
@click.pass_obj
def rule_stats(
    obj: OperatorContext, rule_id: int, per_port: bool, per_target: bool, fmt: str
) -> None:
    """Show a rule's byte and connection counters.

    bytes in = from the connecting client towards the target; bytes out = back.

    \b
    Example:
      portunus-server rule-stats 7 --per-port
    """
    hint_vars(rule_id=rule_id)
    params: dict[str, Any] = {"id": rule_id}
    if per_port:
        params["per_port"] = True
    if per_target:
        params["per_target"] = True
    result = obj.call("rules.stats", params)
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(output.stats_text(result))


@cli.command("remove-rule")
@click.argument("rule_id", metavar="ID", type=BoundedNumber(RULE_ID))
@format_option
@click.pass_obj
def remove_rule(obj: OperatorContext, rule_id: int, fmt: str) -> None:
    """Remove a rule; open connections drain before it disappears.

    The listener stops accepting at once; connections get up to
    shutdown_drain_timeout_secs (default 30) to finish.

    \b
    Example:
      portunus-server remove-rule 7
    """
    hint_vars(rule_id=rule_id)
    result = obj.call("rules.remove", {"id": rule_id})
    if fmt == "json":
        echo_json(result)
    else:
        click.echo(f"rule {rule_id} removed (draining open connections)")


# ------------------------------------------------------------------ clients, audit


@cli.command("list-clients")
@paging.limit_option
@paging.cursor_option
@paging.all_option
@click.option(
    "--connected/--disconnected", default=None, help="Only connected / only offline clients."
)
@click.option(
    "--name-prefix", default=None, help="Only clients whose name starts with this (case-sensitive)."
)
@format_option
@click.pass_obj
def list_clients(
    obj: OperatorContext,
    limit: int | None,
    cursor: str | None,
    every: bool,
    connected: bool | None,
    name_prefix: str | None,
    fmt: str,
) -> None:
    """List enrolled clients (edges) and whether they are connected: one page
    (local first, then enrollment order), or every one with --all.

    \b
    Examples:
      portunus-server list-clients --format json
      portunus-server list-clients --connected --name-prefix edge- --all
    """
    params: dict[str, Any] = {}
    if connected is not None:
        params["connected"] = connected
    if name_prefix:
        params["name_prefix"] = name_prefix
    result = paging.fetch(obj.call, "clients.list", params, "clients", limit, cursor, every)
    paging.show(result, "clients", fmt, output.clients_table)


@cli.command("audit")
@click.option(
    "--since", type=WhenType(), help="From this time: RFC 3339 or an age like 30m, 1h, 2d."
)
@click.option("--until", type=WhenType(), help="Up to this time (same forms as --since).")
@paging.limit_option
@paging.cursor_option
@paging.all_option
@format_option
@click.pass_obj
def audit(
    obj: OperatorContext,
    since: str | None,
    until: str | None,
    limit: int | None,
    cursor: str | None,
    every: bool,
    fmt: str,
) -> None:
    """Show the audit trail of operator actions, newest first.

    \b
    Examples:
      portunus-server audit --since 1h
      portunus-server audit --since 2024-05-01T00:00:00Z --until 2024-05-02T00:00:00Z --limit 1000
    """
    params: dict[str, Any] = {}
    for key, value in (("since", since), ("until", until)):
        if value is not None:
            params[key] = value
    result = paging.fetch(obj.call, "audit.list", params, "entries", limit, cursor, every)
    paging.show(result, "entries", fmt, output.audit_table)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name=PROG)


if __name__ == "__main__":
    main()
