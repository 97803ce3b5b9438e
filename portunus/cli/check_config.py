"""``portunus-server check-config [--config F]``: validate server.toml, like ``nginx -t``.

Imported lazily through ``server.LAZY_VERBS``; importing it registers the verb.
The same loader ``serve`` and a reload use, so "check-config says ok" means "serve
and a reload accept it".  Exit 0 when valid, 2 with every error as
``file:line: reason`` otherwise.  The unit's ExecReload runs it before SIGHUP, so
``systemctl reload portunus`` fails visibly on a broken file.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from portunus.cli.common import OperatorContext
from portunus.config import ConfigError, Settings, load_server_settings
from portunus.exitcodes import ServiceExit


def own_listener_clashes(settings: Settings) -> list[tuple[str, str]]:
    """Two own listeners on one address cannot both bind: say so before serve does.
    Returns ``[(key, reason)]``."""
    keys = ("operator_http_listen", "metrics_listen", "control_listen")
    seen: dict[str, str] = {}
    errors: list[tuple[str, str]] = []
    for key in keys:
        addr = getattr(settings, key)
        if addr in seen:
            errors.append(
                (
                    key,
                    f"{key} = {addr!r} is the address of {seen[addr]} too; give each its own port",
                )
            )
        seen.setdefault(addr, key)
    return errors


def _line_of(path: str) -> Callable[[str], int]:
    """The line of a top-level key in ``path`` (1 when it cannot be found)."""
    from portunus.config import _Locator

    try:
        with open(path, encoding="utf-8") as f:
            locator = _Locator(f.read())
    except (OSError, UnicodeDecodeError):
        return lambda _key: 1
    return locator.top_key


@click.command("check-config")
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The file to check (default: the one serve would read: --config before the verb, "
    "<data-dir>/server.toml, then /etc/portunus/server.toml).",
)
@click.pass_obj
def check_config(obj: OperatorContext, config_path: str | None) -> None:
    """Validate server.toml and exit: 0 valid, 2 invalid (every error as file:line: reason).

    \b
    Example:
      portunus-server check-config --config /etc/portunus/server.toml && systemctl reload portunus
    """
    path = config_path or obj.config
    try:
        settings = load_server_settings(obj.data_dir, path)
    except ConfigError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        click.echo(f"{len(exc.errors)} error(s); a reload would change nothing", err=True)
        sys.exit(ServiceExit.CONFIG_INVALID)
    where = settings.config_path or "(no server.toml found: every key at its default)"
    clashes = own_listener_clashes(settings)
    if clashes:
        locate = _line_of(settings.config_path)
        for key, line in clashes:
            click.echo(f"{where}:{locate(key)}: {line}", err=True)
        click.echo(f"{len(clashes)} error(s); a reload would change nothing", err=True)
        sys.exit(ServiceExit.CONFIG_INVALID)
    click.echo(f"{where}: ok")


def _register() -> None:
    from portunus.cli.server import cli

    if "check-config" not in cli.commands:
        cli.add_command(check_config, "check-config")


_register()
