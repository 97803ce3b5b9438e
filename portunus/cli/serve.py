"""``portunus-server serve``: the appliance — supervisor, control, web, shards."""

from __future__ import annotations

import grp
import http.client
import os
import secrets
import sys
from typing import Any

import click

from portunus import __version__
from portunus.bounds import SHARDS
from portunus.cli.numbers import BoundedNumber
from portunus.config import ConfigError, Settings, load_server_settings, parse_listen
from portunus.errors import PortunusError
from portunus.exitcodes import ServiceExit

EX_CONFIG = ServiceExit.CONFIG


@click.command()
@click.option(
    "--shards",
    type=BoundedNumber(SHARDS),
    default=None,
    help="Data-plane processes (default: one per CPU).",
)
@click.pass_obj
def serve(obj: Any, shards: int | None) -> None:
    """Run the appliance: control process, HTTP API + UI, metrics and one shard per CPU.

    \b
    Developer run from a checkout (no root, data under ./var):
        portunus-server --data-dir ./var serve
    The first start writes an operator token to <data-dir>/operator.token.
    Stop with Ctrl-C or SIGTERM (open connections drain first); SIGHUP reloads.
    """
    data_dir = obj.data_dir
    try:
        settings = load_server_settings(data_dir, obj.config)
    except ConfigError as exc:
        for line in exc.errors:
            click.echo(f"error: config: {line}", err=True)
        sys.exit(EX_CONFIG)
    if shards:
        settings.shards = shards
    try:
        prepare_dirs(settings)
        from portunus.control.store import check_schema

        check_schema(settings.db_path)
    except PortunusError as exc:
        click.echo(f"error: {exc.code}: {exc.message}", err=True)
        sys.exit(ServiceExit.CONFIG if exc.code == "schema_too_new" else ServiceExit.ERROR)
    except OSError as exc:
        click.echo(f"error: cannot prepare {exc.filename}: {exc.strerror}", err=True)
        sys.exit(1)
    token_note = ensure_operator_token(settings)
    from portunus.cli.secret_files import EXIT_INSECURE, insecure, secret_paths

    problems = insecure(secret_paths(settings))
    if problems:
        for line in problems:
            click.echo(line, err=True)
        sys.exit(EXIT_INSECURE)
    setup_note = ensure_setup_token(settings)
    if setup_note:
        token_note += "\n  " + setup_note
    sys.exit(run(settings, token_note, obj.config))


def prepare_dirs(settings: Settings) -> None:
    for path in (settings.data_dir, settings.runtime_dir):
        os.makedirs(path, mode=0o750, exist_ok=True)


def _portunus_gid() -> int | None:
    try:
        return grp.getgrnam("portunus").gr_gid
    except KeyError:
        return None


def ensure_operator_token(settings: Settings) -> str:
    """First start: write a fresh operator token (0600; 0640 group portunus when
    installed, so members of the group can use the CLI).  Returns a note for the banner."""
    if settings.operator_token:
        return "operator token: operator_token in server.toml"
    path = settings.token_path
    if not os.path.exists(path):
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        gid = _portunus_gid()
        if gid is not None:
            try:
                os.chown(path, -1, gid)
                os.chmod(path, 0o640)
            except OSError:
                pass
    return f"operator token: {path}   (export PORTUNUS_OPERATOR_TOKEN=$(cat {path}))"


def setup_link(settings: Settings, token: str) -> str:
    host, port = parse_listen(settings.operator_http_listen)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/setup?token={token}"


def ensure_setup_token(settings: Settings) -> str | None:
    """First run: while no superadmin has a password, write a fresh one-time
    setup token to <data-dir>/setup.token (0600, valid 30 minutes from now) and
    return the line with the setup link; once setup is done, remove any left."""
    from portunus.control.sessions import SETUP_TOKEN_FILE
    from portunus.control.store.offline import superadmin_has_password

    path = os.path.join(settings.data_dir, SETUP_TOKEN_FILE)
    if superadmin_has_password(settings.db_path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return None
    token = secrets.token_urlsafe(32)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return (
        f"first-run setup (valid 30 min): {setup_link(settings, token)}\n"
        f"    (or: portunus-server --data-dir {settings.data_dir} user-add ID --role superadmin --password-stdin)"
    )


def _api_healthy(listen: str) -> bool:
    """True once ``GET /v1/health`` answers 200: the web process serves *and* reaches
    control over its socket.  A bare TCP connect is not enough — control opens its
    socket after syncing the shards, and READY=1 must mean the CLI and API work."""
    host, port = parse_listen(listen)
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    conn = http.client.HTTPConnection(host, port, timeout=0.5)
    try:
        conn.request("GET", "/v1/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def bind_own_listeners(
    settings: Settings, config_path: str | None, store: Any = None
) -> dict[str, Any]:
    """Bind the API, metrics and edge gateway sockets before anything forks; a
    taken or invalid address ends ``serve`` here with exit 73 (LISTEN_FAILED)."""
    from portunus.supervisor.own_listeners import BindError, bind_all, exit_listen_failed

    where = settings.config_path or config_path or os.path.join(settings.data_dir, "server.toml")
    try:
        return bind_all(
            [
                ("operator_http_listen", settings.operator_http_listen, "operator HTTP API"),
                ("metrics_listen", settings.metrics_listen, "metrics endpoint"),
                ("control_listen", settings.control_listen, "edge gateway"),
            ],
            where,
            store,
        )
    except BindError as exc:
        exit_listen_failed(exc)


def run(settings: Settings, token_note: str, config_path: str | None = None) -> int:
    from portunus.supervisor.bootstrap import prepare_metrics_dir, prepare_process

    prepare_process("portunus: supervisor", settings.log_format, settings.log_level)
    from portunus.supervisor.fdstore import FdStore

    store = FdStore()  # sockets systemd kept across a restart, when the unit has a store
    own = bind_own_listeners(settings, config_path, store)
    prepare_metrics_dir(settings.runtime_dir)

    from portunus.cli.standalone import shard_settings
    from portunus.process_trees import SERVE, Launch
    from portunus.supervisor.arbiter import Supervisor
    from portunus.supervisor.reload import SettingsReloader

    click.echo(
        f"portunus-server {__version__}: data {settings.data_dir}, {settings.shard_count()} shard(s)\n"
        f"  Web UI:  http://{settings.operator_http_listen}/   API: http://{settings.operator_http_listen}/v1\n"
        f"  metrics: http://{settings.metrics_listen}/metrics\n"
        f"  control: {settings.socket_path}\n"
        f"  {token_note}\n"
        f"  first rule: portunus-server --data-dir {settings.data_dir} push-rule local 18080 127.0.0.1:8080",
        err=True,
    )
    launch = Launch(settings, listeners={key: o.sock for key, o in own.items()})
    sup = Supervisor(
        children=SERVE.children(launch),
        source_role=SERVE.source_role,
        listen_address=settings.listen_address,
        shard_settings=shard_settings(settings),
        drain_secs=settings.shutdown_drain_timeout_secs,
        metrics_dir=settings.metrics_dir,
        ready_checks=[lambda: _api_healthy(settings.operator_http_listen)],
        fdstore=store,
        reloader=SettingsReloader(
            settings,
            lambda: load_server_settings(
                settings.data_dir, config_path or settings.config_path or None
            ),
            settings.config_path or config_path or os.path.join(settings.data_dir, "server.toml"),
        ).reload,
    )
    return sup.run()
