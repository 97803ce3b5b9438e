"""Entry point of the control process (forked by the supervisor of ``serve``).

Start order matters: the store is migrated and the operator token installed
before the socket exists, so the first request a CLI manages to send is already
served with the full state; the initial ``sync`` goes out before the socket
opens too, so the data plane starts re-binding stored rules without waiting for
anyone to ask.  The edge gateway serves the socket the supervisor bound for it
(``serve`` binds every own listener before it forks, so a taken ``control_listen``
fails the start).  Run without one (tests), control binds it itself; a failure
is logged naming ``control_listen`` and control exits ``LISTEN_FAILED``, which
the supervisor treats as fatal.  Control says ``up`` when all of that is done.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable

import uvloop

from portunus.config import Settings, parse_listen
from portunus.control.auth import Authenticator, install_operator_token, read_operator_token
from portunus.control.counters import RuleCounters
from portunus.control.dataplane import LOCAL, DataPlanes
from portunus.control.fleet.cert import ensure_server_cert
from portunus.control.fleet.clients import ClientService
from portunus.control.fleet.gateway import EdgeGateway
from portunus.control.fleet.heap import pin_mmap_threshold
from portunus.control.fleet.preauth import PreauthLimits
from portunus.control.fleet.remote_link import RemoteLink
from portunus.control.fleet.shedding import Shedder
from portunus.control.local_link import LocalLink
from portunus.control.owner_caps import OwnerCapService
from portunus.control.rpc.handlers import ControlContext, Dispatcher
from portunus.control.rpc.server import RpcServer
from portunus.control.service import RuleService, StateSink
from portunus.control.store import Store
from portunus.control.traffic import TrafficSampler, counters_reader
from portunus.exitcodes import ChildExit
from portunus.logs import configure, log_event
from portunus.supervisor.reload import apply_settings


def _state_sink() -> StateSink | None:
    """The rule-state gauge, when metrics are in multiprocess mode.

    The supervisor exports PROMETHEUS_MULTIPROC_DIR before importing anything.
    Without it a gauge would live only in this process's memory where nobody
    scrapes it, so there is no gauge at all.
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    from portunus.control.stats import RuleStateGauge

    return RuleStateGauge()


def _clients_gauge() -> Callable[[int], None] | None:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    from portunus.control.fleet.metrics import ClientsConnectedGauge

    return ClientsConnectedGauge()


def _preauth_limits(settings: Settings) -> PreauthLimits:
    on_refused: Callable[[str], None] | None = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from portunus.control.fleet.metrics import PreauthRefusedCounter

        on_refused = PreauthRefusedCounter()
    return PreauthLimits(
        settings.edge_preauth_max_connections, settings.edge_preauth_max_per_source, on_refused
    )


class GatewayBindFailed(Exception):
    """control_listen could not be bound (already logged); fatal to control."""


async def start_gateway(gateway: EdgeGateway, control_listen: str) -> bool:
    """Serve the edge gateway; a bind failure is logged (naming the key) and
    returns False."""
    try:
        await gateway.start()
    except OSError as exc:
        log_event(
            "edge.gateway_bind_failed",
            level="error",
            control_listen=control_listen,
            error=exc.strerror or str(exc),
            hint="set control_listen in server.toml to a free address",
        )
        return False
    log_event("edge.gateway_ready", control_listen=control_listen, port=gateway.bound_port)
    return True


async def serve_control(
    settings: Settings, channel_sock: socket.socket, gateway_sock: socket.socket | None = None
) -> str:
    """Run until SIGTERM/SIGINT or until the supervisor channel closes; return why."""
    loop = asyncio.get_running_loop()
    stopping: asyncio.Future[str] = loop.create_future()

    def stop(why: str) -> None:
        if not stopping.done():
            stopping.set_result(why)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, signal.Signals(sig).name)
    # A reload reaches control as a "settings" frame from the supervisor, never as a
    # signal: a stray SIGHUP (kill -HUP to the whole group) must not end control.
    loop.add_signal_handler(signal.SIGHUP, lambda: log_event("control.sighup_ignored"))

    store = await Store.open(settings.db_path)
    server: RpcServer | None = None
    link: LocalLink | None = None
    service: RuleService | None = None
    gateway: EdgeGateway | None = None
    sampler: TrafficSampler | None = None
    counters: RuleCounters | None = None
    try:
        token = read_operator_token(settings)
        if token is not None:
            token_id = await install_operator_token(store, token)
            log_event("control.operator_token", token_id=token_id, user="operator")
        else:
            log_event("control.no_operator_token", level="warning", path=settings.token_path)
        link = LocalLink(channel_sock, on_close=lambda why: stop(f"supervisor channel: {why}"))
        pin_mmap_threshold()  # before any link: see control.fleet.heap
        link.on_settings = lambda changed: apply_settings(settings, changed)
        remote = RemoteLink(on_count=_clients_gauge())
        planes = DataPlanes(link, remote)
        state_sink = _state_sink()
        service = RuleService(store, planes, settings, on_state=state_sink)
        link.events = service
        remote.events = service
        link.start()
        service.start()
        await service.forget_draining(LOCAL)
        await service.sync_client(LOCAL)
        listen_host, listen_port = parse_listen(settings.control_listen, "control_listen")
        cert = await asyncio.to_thread(ensure_server_cert, settings.data_dir, listen_host)
        gateway = EdgeGateway(
            store,
            remote,
            cert.ssl_context(),
            listen_host,
            listen_port,
            handshake_timeout=settings.edge_handshake_timeout_secs,
            park_secs=settings.edge_preauth_park_secs,
            preauth=_preauth_limits(settings),
            shedder=Shedder(service.backlog),
            sock=gateway_sock,
        )
        if not await start_gateway(gateway, settings.control_listen):
            gateway = None
            raise GatewayBindFailed(settings.control_listen)
        clients = ClientService(
            store,
            remote,
            cert.fingerprint,
            listen_host,
            port=lambda: (gateway.bound_port if gateway is not None else None) or listen_port,
            on_state=state_sink,
        )
        sampler = TrafficSampler(
            store,
            counters_reader(settings.metrics_dir, remote),
            interval=settings.traffic_sample_interval_secs,
        )
        sampler.start()
        ctx = ControlContext(
            settings,
            store,
            Authenticator(store),
            service,
            planes,
            remote,
            clients,
            traffic=sampler,
            owner_caps=OwnerCapService(store, planes),
        )
        counters = RuleCounters(store, settings, remote)
        await counters.load()
        try:
            await counters.snapshot()  # this run's file, before anything says up
        except Exception as exc:  # noqa: BLE001 - counters must never stop control
            # e.g. a shard's metrics file caught while it is being created; the
            # periodic snapshot catches up, and web reads an old file as "known".
            log_event("counters.snapshot_failed", level="warning", error=repr(exc))
        counters.start()
        ctx.counters = counters
        server = RpcServer(settings.socket_path, Dispatcher(ctx))
        await server.start()
        log_event("control.ready", socket=settings.socket_path, db=settings.db_path)
        link.say_up()
        return await stopping
    finally:
        if server is not None:
            await server.close()
        if sampler is not None:
            await sampler.stop()
        if counters is not None:
            await counters.stop()
        if gateway is not None:
            await gateway.close()
        if service is not None:
            await service.stop()
        if link is not None:
            link.close()
        await store.close()


def run_control(
    settings: Settings, channel_sock: socket.socket, gateway_sock: socket.socket | None = None
) -> None:
    """Body of the forked control process; returns when it should exit 0.

    Raises on a fatal start error (``SchemaTooNew`` is a ``PortunusError`` with
    exit code 78) — the caller logs it and exits non-zero.
    """
    configure(process="control")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            why = runner.run(serve_control(settings, channel_sock, gateway_sock))
    except GatewayBindFailed:
        raise SystemExit(ChildExit.LISTEN_FAILED) from None
    log_event("control.stopped", reason=why)
