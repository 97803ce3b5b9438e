"""``portunus-standalone``: forward from a TOML file, no control plane.

portunus-standalone --check --config F   validate (exit 0 ok, 2 invalid)
portunus-standalone --config F           run; SIGHUP re-reads F
portunus-standalone stats --config F     live per-rule counters
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from typing import Any

import click

from portunus import __version__
from portunus.bounds import CLI_INTERVAL, SHARDS
from portunus.cli.numbers import BoundedNumber
from portunus.config import ConfigError, Settings, load_standalone
from portunus.exitcodes import ServiceExit
from portunus.rules import Rule

DEFAULT_CONFIG = "/etc/portunus/standalone.toml"


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar="PORTUNUS_CONFIG",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="Standalone TOML file ([[rule]] tables).",
)
@click.option(
    "--check",
    is_flag=True,
    help="Validate the file and exit: 0 valid, 2 invalid (file:line: reason).",
)
@click.option(
    "--shards",
    type=BoundedNumber(SHARDS),
    default=None,
    help="Data-plane processes (default: one per CPU, or `shards` in the file).",
)
@click.version_option(__version__, prog_name="portunus-standalone")
@click.pass_context
def main(ctx: click.Context, config_path: str, check: bool, shards: int | None) -> None:
    """Forward TCP/UDP ports from a TOML file, with no server.

    \b
    Example forward.toml:
        metrics_listen = "127.0.0.1:7083"   # the default; the server uses 7081
        [[rule]]
        name = "web"
        listen_port = 8080
        target = "10.0.0.5:80"
    \b
    Run it:   portunus-standalone --config forward.toml
    Reload:   kill -HUP <pid>     (applies only the difference)
    Counters: portunus-standalone stats --config forward.toml --watch
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path
    if ctx.invoked_subcommand is not None:
        return
    try:
        settings, rules = load_standalone(config_path)
    except ConfigError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        click.echo(f"{config_path}: {len(exc.errors)} error(s); nothing started", err=True)
        sys.exit(ServiceExit.CONFIG_INVALID)
    if check:
        click.echo(f"{config_path}: ok ({len(rules)} rule(s))")
        return
    if shards:
        settings.shards = shards
    sys.exit(run(config_path, settings, rules))


def run(config_path: str, settings: Settings, rules: list[Rule]) -> int:
    from portunus.supervisor.bootstrap import prepare_metrics_dir, prepare_process

    prepare_process("portunus: supervisor (standalone)", settings.log_format, settings.log_level)
    runtime = os.environ.get("PORTUNUS_RUNTIME_DIR") or os.environ.get("RUNTIME_DIRECTORY")
    # Without a runtime dir (systemd's RuntimeDirectory=), use a private temp dir: the
    # metrics files and UDP flow budgets must not sit in a world-writable directory.
    private = None if runtime else tempfile.mkdtemp(prefix="portunus-standalone-")
    settings.runtime_dir = runtime or private or ""
    metrics_dir = prepare_metrics_dir(settings.runtime_dir)

    from portunus.process_trees import STANDALONE, Launch
    from portunus.supervisor.arbiter import Supervisor
    from portunus.supervisor.fdstore import FdStore
    from portunus.supervisor.reload import SettingsReloader
    from portunus.supervisor.sources import TomlSource

    store = FdStore()  # sockets systemd kept across a restart, when the unit has a store
    metrics_sock = bind_metrics(settings.metrics_listen, "metrics_listen", config_path, store)
    source = TomlSource(config_path, initial=rules)
    reloader = SettingsReloader(settings, source.loaded_settings, config_path)
    _banner(config_path, settings, rules)
    launch = Launch(
        settings,
        listeners={"metrics_listen": metrics_sock},
        instance={"kind": "standalone", "config": os.path.realpath(config_path)},
    )
    sup = Supervisor(
        children=STANDALONE.children(launch),
        listen_address=settings.listen_address,
        shard_settings=shard_settings(settings),
        drain_secs=settings.shutdown_drain_timeout_secs,
        metrics_dir=metrics_dir,
        source=source,
        fdstore=store,
        # Top-level settings of the same file: the rules' reload logs the outcome.
        reloader=lambda: reloader.reload(log_outcome=False),
    )
    try:
        return sup.run()
    finally:
        if private:
            shutil.rmtree(private, ignore_errors=True)


def bind_metrics(listen: str, key: str, where: str, store: Any = None) -> socket.socket:
    """Bind /metrics before anything forks: a taken address ends the start here
    with exit 73 (LISTEN_FAILED), naming the address and the key to change."""
    from portunus.supervisor.own_listeners import BindError, bind_kept, exit_listen_failed

    try:
        return bind_kept(listen, key, "metrics endpoint", where, store)
    except BindError as exc:
        exit_listen_failed(exc)


def shard_settings(settings: Settings, client: str = "local") -> dict[str, object]:
    return {
        "client": client,
        "connect_timeout_secs": settings.connect_timeout_secs,
        "sni_client_hello_timeout_secs": settings.sni_client_hello_timeout_secs,
        "shutdown_drain_timeout_secs": settings.shutdown_drain_timeout_secs,
        "udp_flow_idle_secs": settings.udp_flow_idle_secs,
        "udp_max_flows": settings.udp_max_flows,
        "use_splice": os.environ.get("PORTUNUS_NO_SPLICE") != "1",
        "shards": settings.shard_count(),
        "runtime_dir": settings.runtime_dir,
        "log_format": settings.log_format,
        "log_level": settings.log_level,
    }


def _banner(path: str, settings: Settings, rules: list[Rule]) -> None:
    lines = [
        f"portunus-standalone {__version__}: {len(rules)} rule(s) from {path}, "
        f"{settings.shard_count()} shard(s), listening on {settings.listen_address}"
    ]
    for r in rules:
        listen = str(r.listen_start) if not r.is_range else f"{r.listen_start}-{r.listen_end}"
        extra = f" sni={r.sni}" if r.sni else ""
        lines.append(
            f"  {r.id}: {r.protocol} {listen} -> {', '.join(t.label for t in r.targets)}{extra}"
        )
    lines.append(
        f"  metrics: http://{settings.metrics_listen}/metrics   (stats: portunus-standalone stats --config {path})"
    )
    click.echo("\n".join(lines), err=True)


@main.command()
@click.option(
    "--config", "config_path", default=None, help="Standalone TOML file (to find metrics_listen)."
)
@click.option("--watch", is_flag=True, help="Refresh every second with rates.")
@click.option(
    "--interval",
    type=BoundedNumber(CLI_INTERVAL),
    default=1.0,
    show_default=True,
    help="Refresh interval for --watch.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.pass_context
def stats(
    ctx: click.Context, config_path: str | None, watch: bool, interval: float, fmt: str
) -> None:
    """Live per-rule counters: bytes in/out, connections, rates.

    Reads the running instance's /metrics (metrics_listen in the file), and
    refuses (exit 1, wrong_instance) when that endpoint is served by another
    program or by portunus-standalone with another config.
    """
    from portunus.cli.standalone_stats import show_stats

    path = config_path or ctx.obj["config"]
    try:
        settings, _rules = load_standalone(path)
    except ConfigError as exc:
        for line in exc.errors:
            click.echo(line, err=True)
        sys.exit(2)
    sys.exit(show_stats(settings.metrics_listen, watch, interval, fmt, os.path.realpath(path)))
