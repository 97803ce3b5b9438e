"""The web process: the /v1 API and /metrics, two uvicorn servers on one uvloop loop.

``run_web`` runs in a child the supervisor forked (it has already reset signal
handlers and set the process title).  Under ``serve`` the supervisor has bound
both listening sockets already (supervisor/own_listeners.py) and the child
inherits them; run on its own (tests) it binds them itself, and a taken port
fails fast with a message that names the address and the config key to change,
exiting ``ChildExit.LISTEN_FAILED`` rather than uvicorn's generic startup failure.
Once both servers serve, it says ``up`` on its supervisor channel (when it has
one): the supervisor counts a child that dies before that as unable to start.

Signals belong to the process, not to one server: uvicorn's per-server signal
capture (which re-raises SIGTERM after shutdown, i.e. dies by signal) is disabled,
and one SIGTERM/SIGINT handler stops both servers and ends open SSE streams; the
process then returns normally (exit 0).  uvicorn's own log lines become JSON lines
through ``portunus.logs``; its access log stays off (no request lines, so no
headers and never a token in the logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from portunus.config import Settings
from portunus.exitcodes import ChildExit
from portunus.ipc.channel_end import say_up
from portunus.logs import log_event
from portunus.supervisor.own_listeners import BindError, bind
from portunus.web.app import create_app
from portunus.web.limits import KEEP_ALIVE_SECS, MAX_HEADER_BYTES, guarded_protocol

__all__ = ["BindError", "bind", "run_web", "serve_all"]
# Seconds uvicorn waits for open requests on shutdown; SSE streams end on their own
# (app.state.stopping), so this only bounds a slow control call.
GRACEFUL_SHUTDOWN_SECS = 5


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to ``run_web``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# uvicorn logs these per Server; this process runs two (API and /metrics) for one
# pid, so each would appear twice, identical.  They are said once per process.
_ONCE_PER_PROCESS = frozenset(
    {"Started server process [%d]", "Shutting down", "Finished server process [%d]"}
)


class _JsonLogHandler(logging.Handler):
    """uvicorn's logger records -> ``log_event`` JSON lines on stderr."""

    def __init__(self) -> None:
        super().__init__()
        self._said: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg in _ONCE_PER_PROCESS:
            if record.msg in self._said:
                return
            self._said.add(record.msg)
        level = (
            "error"
            if record.levelno >= logging.ERROR
            else (
                "warning"
                if record.levelno >= logging.WARNING
                else ("info" if record.levelno >= logging.INFO else "debug")
            )
        )
        fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info and record.exc_info[0] is not None:
            fields["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        log_event("web.server", level=level, **fields)


def route_uvicorn_logs(level: str = "info") -> None:
    root = logging.getLogger("uvicorn")
    root.handlers = [_JsonLogHandler()]
    root.propagate = False
    root.setLevel(
        level.upper() if level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO"
    )
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
    access.disabled = True


def _metrics_app(settings: Settings) -> Any:
    try:
        from portunus.web.metrics import create_metrics_app
    except ImportError as exc:
        log_event(
            "web.metrics_disabled",
            level="warning",
            reason=f"portunus.web.metrics unavailable: {exc}",
        )
        return None
    return create_metrics_app(settings)


def _config(app: Any, settings: Settings | None = None) -> uvicorn.Config:
    # Header, body, slow-request and connection limits: see portunus.web.limits.
    # Each listener gets its own protocol class: its own connection count and
    # registry of connections the cap may reclaim.
    limits = settings or Settings()
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        loop="none",
        ws="none",
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECS,
        http=guarded_protocol(limits.http_max_connections, limits.http_request_timeout_secs),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=KEEP_ALIVE_SECS,
    )


def _watch_channel(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, settings: Settings
) -> None:
    """Apply a reload's ``settings`` frames from the supervisor to the live Settings."""
    from portunus.ipc.framing import Channel, ProtocolError, close_fds
    from portunus.ipc.messages import Settings as SettingsMessage
    from portunus.supervisor.reload import apply_settings

    channel = Channel(sock)

    def readable() -> None:
        try:
            frames = channel.read()
        except (EOFError, ProtocolError, OSError):
            loop.remove_reader(sock.fileno())
            return
        for msg, fds in frames:
            close_fds(fds)
            if isinstance(msg, SettingsMessage):
                apply_settings(settings, msg.settings)
                route_uvicorn_logs(settings.log_level)

    loop.add_reader(sock.fileno(), readable)


async def serve_all(
    api: Any,
    pairs: list[tuple[Any, socket.socket]],
    on_up: Callable[[], None] | None = None,
    settings: Settings | None = None,
) -> None:
    """Serve each ``(app, socket)`` until SIGTERM/SIGINT or until any server stops;
    ``on_up`` runs once every server has started."""
    servers = [(_Server(_config(app, settings)), sock) for app, sock in pairs]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        api.state.stopping.set()
        for server, _ in servers:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    # Nothing here to reload, and SIGHUP's default action would kill the process
    # if a supervisor forwards a reload to its whole tree.
    loop.add_signal_handler(signal.SIGHUP, lambda: log_event("web.sighup_ignored"))
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
    try:
        while (
            on_up is not None
            and not all(s.started for s, _ in servers)
            and not any(t.done() for t in tasks)
        ):
            await asyncio.sleep(0.01)
        if on_up is not None and all(s.started for s, _ in servers):
            on_up()
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop()
        await asyncio.gather(*tasks)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def run_web(
    settings: Settings,
    api_sock: socket.socket | None = None,
    metrics_sock: socket.socket | None = None,
    channel: socket.socket | None = None,
) -> None:
    """Entry point of the forked web child; returns on SIGTERM (exit 0), raises
    ``SystemExit(ChildExit.LISTEN_FAILED)`` when it must bind a port itself and cannot."""
    import uvloop

    route_uvicorn_logs(settings.log_level)
    api = create_app(settings)
    metrics = _metrics_app(settings)
    pairs: list[tuple[Any, socket.socket]] = []
    try:
        pairs.append(
            (
                api,
                api_sock
                or bind(settings.operator_http_listen, "operator_http_listen", "operator HTTP API"),
            )
        )
        if metrics is not None:
            pairs.append(
                (
                    metrics,
                    metrics_sock
                    or bind(settings.metrics_listen, "metrics_listen", "metrics endpoint"),
                )
            )
    except BindError as exc:
        for _, sock in pairs:
            sock.close()
        log_event("web.bind_failed", level="error", message=str(exc))
        raise SystemExit(ChildExit.LISTEN_FAILED) from None
    log_event(
        "web.listening",
        api=settings.operator_http_listen,
        metrics=settings.metrics_listen if metrics is not None else None,
    )

    async def main() -> None:
        if channel is not None:
            _watch_channel(asyncio.get_running_loop(), channel, settings)
        await serve_all(
            api,
            pairs,
            on_up=(lambda: say_up(channel)) if channel is not None else None,
            settings=settings,
        )

    uvloop.run(main())
    log_event("web.stopped")
