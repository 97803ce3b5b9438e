"""``portunus-client``: an edge that forwards whatever its server assigns.

    portunus-client enroll 'portunus://HOST:7443/enroll?code=…&fp=sha256:…' --out FILE
    portunus-client --bundle FILE [--data-dir D] [--metrics-listen A] [--shards N]

The run mode runs the client tree (portunus/process_trees.py): the same
supervisor and shards as standalone and server, with two services: ``link`` (the
rule source: the TLS link to the server, see portunus/edge/link.py) and
``metrics`` (/metrics on ``--metrics-listen``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import TYPE_CHECKING, NoReturn

import click

from portunus import __version__
from portunus.bounds import CLI_INTERVAL, SHARDS
from portunus.cli.numbers import BoundedNumber
from portunus.config import CLIENT_METRICS_LISTEN
from portunus.errors import EXIT_ERROR, EXIT_UNAUTHENTICATED, EXIT_USAGE
from portunus.ipc.edge_wire import CAPABILITIES

if TYPE_CHECKING:
    from portunus.config import Settings
    from portunus.edge.bundle import Bundle

DEFAULT_DATA_DIR = "/var/lib/portunus-client"
EXIT_REVOKED = EXIT_UNAUTHENTICATED  # the token is dead for good


def _fail(message: str, code: int, hint: str | None = None) -> NoReturn:
    click.echo(f"portunus-client: error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    sys.exit(code)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--bundle",
    "bundle_path",
    envvar="PORTUNUS_BUNDLE",
    metavar="FILE",
    help="The bundle `enroll` wrote (server address, pinned fingerprint, token).",
)
@click.option(
    "--data-dir",
    default=DEFAULT_DATA_DIR,
    show_default=True,
    metavar="DIR",
    envvar="PORTUNUS_CLIENT_DATA_DIR",
    help="Where the client keeps rules.json (the last rules the server sent), so it "
    "forwards after a restart even while the server is down.",
)
@click.option(
    "--metrics-listen",
    default=CLIENT_METRICS_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Serve Prometheus /metrics here (not the server's 7081, so both can run on one host).",
)
@click.option(
    "--shards",
    type=BoundedNumber(SHARDS),
    default=None,
    help="Data-plane processes (default: one per CPU).",
)
@click.option(
    "--listen-address",
    default="0.0.0.0",
    show_default=True,
    metavar="ADDR",
    help="Address the forwarded ports bind to.",
)
@click.option(
    "--disable-capability",
    "disabled",
    multiple=True,
    type=click.Choice(CAPABILITIES),
    metavar="NAME",
    help="Do not advertise NAME to the server (repeatable; for testing the "
    f"server's capability gate). One of: {', '.join(CAPABILITIES)}.",
)
@click.option(
    "--stats-interval",
    type=BoundedNumber(CLI_INTERVAL),
    default=5.0,
    show_default=True,
    metavar="SECS",
    help="How often per-rule counters are reported to the server.",
)
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True
)
@click.version_option(__version__, prog_name="portunus-client")
@click.pass_context
def main(
    ctx: click.Context,
    bundle_path: str | None,
    data_dir: str,
    metrics_listen: str,
    shards: int | None,
    listen_address: str,
    disabled: tuple[str, ...],
    stats_interval: float,
    log_format: str,
) -> None:
    """Forward the ports a Portunus server assigns to this machine.

    \b
    1. On the server, mint a one-time code:
         portunus-server enroll-client edge-01 --address SERVER-IP
    2. Here, redeem it (checks the server certificate against the URI's fp):
         portunus-client enroll 'portunus://…/enroll?code=…&fp=sha256:…' --out /etc/portunus/client.bundle
    3. Run the edge:
         portunus-client --bundle /etc/portunus/client.bundle
       (or: systemctl enable --now portunus-client, which loads that file)
    4. On the server, push rules to it like to `local`:
         portunus-server push-rule edge-01 19090 127.0.0.1:9090

    \b
    The client keeps forwarding its last rules while the server is unreachable and
    reconnects by itself. If the server revokes it, it stops and exits 4.
    """
    if ctx.invoked_subcommand is not None:
        return
    if not bundle_path:
        click.echo(ctx.get_help(), err=True)
        _fail("give --bundle FILE (written by `portunus-client enroll URI --out FILE`)", EXIT_USAGE)
    from portunus.config import Settings, parse_listen  # noqa: F811 - runtime import
    from portunus.edge import revoked
    from portunus.edge.bundle import BundleError, read_bundle
    from portunus.errors import PortunusError
    from portunus.rules import validate_host

    try:
        bundle = read_bundle(bundle_path)
    except BundleError as exc:
        _fail(str(exc), EXIT_USAGE)
    try:
        parse_listen(metrics_listen, "--metrics-listen")
        validate_host(listen_address, "--listen-address")
    except PortunusError as exc:
        _fail(exc.message, EXIT_USAGE)
    data_dir = os.path.abspath(data_dir)
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        _fail(
            f"cannot create the data dir {data_dir}: {exc.strerror}",
            EXIT_ERROR,
            "pass --data-dir DIR (a directory this user can write)",
        )
    marker = revoked.read_marker(data_dir, bundle.client_id)
    if marker is not None:
        _fail(revoked.describe(marker, bundle_path), EXIT_REVOKED)
    settings = Settings(
        data_dir=data_dir,
        metrics_listen=metrics_listen,
        listen_address=listen_address,
        log_format=log_format,
        shards=shards or 0,
    )
    runtime = os.environ.get("PORTUNUS_RUNTIME_DIR") or os.environ.get("RUNTIME_DIRECTORY")
    settings.runtime_dir = runtime or os.path.join(data_dir, "run")
    capabilities = [c for c in CAPABILITIES if c not in disabled]
    code = run(settings, bundle, capabilities, stats_interval)
    marker = revoked.read_marker(data_dir, bundle.client_id)
    if marker is not None:
        _fail(revoked.describe(marker, bundle_path), EXIT_REVOKED)
    sys.exit(code)


def run(settings: Settings, bundle: Bundle, capabilities: list[str], stats_interval: float) -> int:
    """Assemble and run the supervisor in this (the service's main) process."""
    from portunus.supervisor.bootstrap import prepare_metrics_dir, prepare_process

    prepare_process("portunus: supervisor (client)", settings.log_format, settings.log_level)
    os.makedirs(settings.runtime_dir, mode=0o700, exist_ok=True)
    metrics_dir = prepare_metrics_dir(settings.runtime_dir)

    from portunus.cli.standalone import bind_metrics, shard_settings
    from portunus.edge.timing import LinkTiming
    from portunus.process_trees import CLIENT, Launch, LinkArgs
    from portunus.supervisor.arbiter import Supervisor
    from portunus.supervisor.fdstore import FdStore

    store = FdStore()  # sockets systemd kept across a restart, when the unit has a store
    metrics_sock = bind_metrics(
        settings.metrics_listen, "--metrics-listen", "the portunus-client command line", store
    )
    launch = Launch(
        settings,
        listeners={"metrics_listen": metrics_sock},
        instance={"kind": "client", "config": os.path.abspath(bundle.path) if bundle.path else ""},
        link=LinkArgs(bundle, capabilities, LinkTiming(stats_secs=stats_interval)),
    )

    click.echo(
        f"portunus-client {__version__}: {bundle.client_name} ({bundle.client_id}) -> server {bundle.server}, "
        f"{settings.shard_count()} shard(s), listening on {settings.listen_address}\n"
        f"  capabilities: {', '.join(capabilities) or '(none)'}\n"
        f"  rules cache:  {os.path.join(settings.data_dir, 'rules.json')}\n"
        f"  metrics:      http://{settings.metrics_listen}/metrics",
        err=True,
    )
    sup = Supervisor(
        children=CLIENT.children(launch),
        source_role=CLIENT.source_role,
        listen_address=settings.listen_address,
        shard_settings=shard_settings(settings, client=bundle.client_name),
        drain_secs=settings.shutdown_drain_timeout_secs,
        metrics_dir=metrics_dir,
        fdstore=store,
    )
    return sup.run()


@main.command()
@click.argument("uri")
@click.option(
    "--out",
    "out_path",
    required=True,
    metavar="FILE",
    help="Where to write the bundle (mode 0600). It holds this client's token: keep it private.",
)
@click.option("--force", is_flag=True, help="Replace an existing bundle at FILE.")
@click.option(
    "--timeout", type=BoundedNumber(CLI_INTERVAL), default=15.0, show_default=True, metavar="SECS"
)
def enroll(uri: str, out_path: str, force: bool, timeout: float) -> None:
    """Redeem a one-time enrollment URI for a bundle.

    \b
    URI is what `portunus-server enroll-client NAME` printed; quote it, the & in it
    means something to the shell:
        portunus-client enroll 'portunus://10.0.0.1:7443/enroll?code=…&fp=sha256:…' --out /etc/portunus/client.bundle
    The server certificate must match the URI's fp (SHA-256 of the certificate) or
    nothing is sent. The code works once; an expired or used one is refused.
    """
    from portunus.edge.bundle import write_bundle
    from portunus.edge.enroll import EnrollError, parse_enroll_uri, redeem
    from portunus.edge.pinning import FingerprintMismatch

    try:
        target = parse_enroll_uri(uri)
    except EnrollError as exc:
        _fail(exc.message, EXIT_USAGE)
    out_path = os.path.abspath(out_path)
    _check_writable(out_path, force)  # before the code is burned
    try:
        bundle = asyncio.run(redeem(target, timeout))
    except FingerprintMismatch as exc:
        _fail(
            f"certificate fingerprint mismatch: expected {exc.expected}, got {exc.got} "
            f"from {exc.where}",
            EXIT_ERROR,
            "nothing was sent and the code is still unused. Check that the URI is the one "
            "enroll-client printed for this server; if the server was reinstalled, mint a new one",
        )
    except EnrollError as exc:
        hint = {
            "enrollment_invalid": "mint a new code on the server: portunus-server enroll-client NAME",
            "unavailable": f"is the server up and its control_listen reachable at {target.server}?",
        }.get(exc.code)
        _fail(f"{exc.code}: {exc.message}", EXIT_ERROR, hint)
    try:
        write_bundle(out_path, bundle)
    except OSError as exc:
        _fail(
            f"enrolled as {bundle.client_name} ({bundle.client_id}) but cannot write {out_path}: "
            f"{exc.strerror}",
            EXIT_ERROR,
            "the code is used up; mint a new one and enroll again",
        )
    click.echo(
        f"enrolled as {bundle.client_name} (client id {bundle.client_id}) with {bundle.server}"
    )
    click.echo(f"bundle written to {out_path} (mode 0600; it holds this client's token)")
    click.echo(f"run: portunus-client --bundle {out_path}")


def _check_writable(path: str, force: bool) -> None:
    if os.path.exists(path) and not force:
        _fail(
            f"{path} exists",
            EXIT_USAGE,
            "pass --force to replace it (the old bundle's token stops "
            "being used here), or choose another --out",
        )
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        _fail(f"cannot create {directory}: {exc.strerror}", EXIT_ERROR)
    if not os.access(directory, os.W_OK):
        _fail(
            f"cannot write to {directory}",
            EXIT_ERROR,
            "choose another --out or run as a user who can",
        )
