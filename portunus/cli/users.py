"""``portunus-server`` verbs for users (docs/users.md): user-add, user-list,
user-remove, user-passwd.  Their tokens and grants are in ``portunus.cli.grants``.

Imported lazily through ``server.LAZY_VERBS``; importing it registers the verbs
on the ``portunus-server`` group.  Passwords come from stdin only
(``--password-stdin``), never from an argument (argv is visible to every local
user); without one, the server makes a temporary password, printed once.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from portunus.cli import output, paging
from portunus.cli.common import OperatorContext, echo_json, format_option
from portunus.errors import PortunusError


def read_password() -> str:
    """The first line of stdin, without its line ending (nothing else is stripped)."""
    line = sys.stdin.readline()
    password = line[:-1] if line.endswith("\n") else line
    password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise PortunusError(
            "validation.password_too_short",
            "--password-stdin read an empty password",
            field="password",
        )
    return password


def _user_text(u: dict[str, Any]) -> list[Any]:
    flags = []
    if u.get("password_change_required"):
        flags.append("must change password")
    if not u.get("has_password"):
        flags.append("no password")
    if u.get("builtin"):
        flags.append("built-in")
    return [
        u.get("user_id"),
        u.get("role"),
        u.get("display_name"),
        ", ".join(flags),
        u.get("created_at"),
    ]


@click.command("user-add")
@click.argument("user_id", metavar="ID")
@click.option(
    "--role", type=click.Choice(("user", "superadmin")), default="user", show_default=True
)
@click.option(
    "--display-name", metavar="NAME", help="Shown in the Web UI (1-64 characters; default: ID)."
)
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password (12-1024 bytes) from the first line of stdin. Without it a "
    "temporary password is printed once and must be changed at first login.",
)
@format_option
@click.pass_obj
def user_add(
    obj: OperatorContext,
    user_id: str,
    role: str,
    display_name: str | None,
    password_stdin: bool,
    fmt: str,
) -> None:
    """Create user ID ([a-z][a-z0-9_-]{0,31}).

    \b
    Examples:
      portunus-server user-add alice --display-name "Alice Martin"
      printf '%s\\n' "$PW" | portunus-server user-add root --role superadmin --password-stdin
    """
    params: dict[str, Any] = {"user_id": user_id, "role": role}
    if display_name is not None:
        params["display_name"] = display_name
    if password_stdin:
        params["password"] = read_password()
    result = obj.call("users.add", params)
    if fmt == "json":
        echo_json(result)
        return
    click.echo(f"user {result['user_id']} ({result['role']}) created")
    if result.get("temporary_password"):
        click.echo(
            f"temporary password (shown once, must be changed at first login): "
            f"{result['temporary_password']}"
        )


@click.command("user-list")
@click.option("--role", type=click.Choice(["superadmin", "user"]), help="Only this role.")
@click.option("--name-prefix", help="Only user ids starting with this (case-sensitive).")
@paging.limit_option
@paging.cursor_option
@paging.all_option
@format_option
@click.pass_obj
def user_list(
    obj: OperatorContext,
    role: str | None,
    name_prefix: str | None,
    limit: int | None,
    cursor: str | None,
    every: bool,
    fmt: str,
) -> None:
    """List users and their roles, by user id: one page, or every one with --all.

    \b
    Example:
      portunus-server user-list --format json
    """
    params = {k: v for k, v in (("role", role), ("name_prefix", name_prefix)) if v}
    result = paging.fetch(obj.call, "users.list", params, "users", limit, cursor, every)
    headers = ("ID", "ROLE", "DISPLAY NAME", "FLAGS", "CREATED")
    paging.show(result, "users", fmt, paging.table_or(headers, _user_text, "no users"))


@click.command("user-remove")
@click.argument("user_id", metavar="ID")
@format_option
@click.pass_obj
def user_remove(obj: OperatorContext, user_id: str, fmt: str) -> None:
    """Remove user ID with its rules (drained like remove-rule), tokens, grants and sessions.

    \b
    Example:
      portunus-server user-remove alice
    """
    result = obj.call("users.remove", {"user_id": user_id})
    if fmt == "json":
        echo_json(result)
        return
    click.echo(
        f"user {result['user_id']} removed; rules removed: {output.id_list(result['removed_rule_ids'])}; "
        f"grants revoked: {output.id_list(result['revoked_grant_ids'])}; tokens revoked: "
        f"{output.id_list(result['revoked_token_ids'])}"
    )


@click.command("user-passwd")
@click.argument("user_id", metavar="ID")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the new password from stdin; without it a temporary password is printed once.",
)
@format_option
@click.pass_obj
def user_passwd(obj: OperatorContext, user_id: str, password_stdin: bool, fmt: str) -> None:
    """Set user ID's password; the user's Web UI sessions end.

    \b
    Examples:
      portunus-server user-passwd alice                # prints a temporary password
      printf '%s\\n' "$PW" | portunus-server user-passwd alice --password-stdin
    """
    params: dict[str, Any] = {"user_id": user_id}
    if password_stdin:
        params["password"] = read_password()
    result = obj.call("users.passwd", params)
    if fmt == "json":
        echo_json(result)
        return
    click.echo(
        f"password of {result['user_id']} set; {result.get('revoked_sessions', 0)} session(s) ended"
    )
    if result.get("temporary_password"):
        click.echo(
            f"temporary password (shown once, must be changed at first login): "
            f"{result['temporary_password']}"
        )


VERBS = {
    c.name: c
    for c in (
        user_add,
        user_list,
        user_remove,
        user_passwd,
    )
}


def _register() -> None:
    from portunus.cli.server import cli

    for name, command in VERBS.items():
        if name not in cli.commands:
            cli.add_command(command, name)


_register()
