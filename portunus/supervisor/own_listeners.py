"""The service's own listening sockets (API, metrics, edge gateway), bound up front.

The supervisor binds them before it forks anything, as nginx does: a taken or
invalid address fails the start at once, in the foreground, with the address and
the key to change, and exit ``LISTEN_FAILED`` (73) -- instead of a child that
fails to bind and is respawned forever while the service says READY.  The
children that serve them inherit the bound socket across fork, so a respawned
web or metrics child never races anyone for its port, and connections that
arrive while it restarts wait in the kernel's accept queue instead of being
refused.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

from portunus.config import parse_listen
from portunus.errors import PortunusError
from portunus.supervisor.fdstore import FdStore


class BindError(Exception):
    """A listening socket could not be opened; ``str()`` is the operator's message."""


def exit_listen_failed(exc: BindError) -> NoReturn:
    """End a CLI start whose own listener could not be bound: exit 73 (LISTEN_FAILED).

    One ending for ``portunus-server serve`` and ``portunus-standalone``, so both log
    the same ``supervisor.listen_failed`` event and print the same error line.
    """
    import click  # the CLI's; kept out of the supervisor's import path

    from portunus.exitcodes import ServiceExit
    from portunus.logs import log_event

    log_event(
        "supervisor.listen_failed",
        level="error",
        message=str(exc),
        exit_code=int(ServiceExit.LISTEN_FAILED),
    )
    click.echo(f"error: listen_failed: {exc}", err=True)
    sys.exit(ServiceExit.LISTEN_FAILED)


@dataclass
class OwnListener:
    """One bound socket and what it is for (for messages and for the fd store)."""

    key: str  # the setting that names the address, e.g. "metrics_listen"
    address: str
    sock: socket.socket


def bind(listen: str, key: str, what: str, where: str = "server.toml") -> socket.socket:
    """Open the listening socket for ``listen`` (the value of ``key`` in ``where``).

    Raises ``BindError`` naming the address, the reason and the key to change.
    """
    try:
        host, port = parse_listen(listen, key)
    except PortunusError as exc:
        raise BindError(f"{key} = {listen!r} is not a valid address: {exc.message}") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise BindError(
            f"cannot listen on {listen} for the {what}: {exc.strerror or exc}; "
            f"set {key} in {where} to a free address"
        ) from None
    sock.setblocking(False)
    return sock


def bind_all(
    specs: list[tuple[str, str, str]], where: str, store: FdStore | None = None
) -> dict[str, OwnListener]:
    """Bind every ``(key, address, what)``; all or none (a failure closes the rest).
    With systemd's fd store, a socket kept across a restart is adopted first."""
    bound: dict[str, OwnListener] = {}
    try:
        for key, address, what in specs:
            bound[key] = OwnListener(key, address, bind_kept(address, key, what, where, store))
    except BindError:
        for own in bound.values():
            own.sock.close()
        raise
    return bound


def bind_kept(listen: str, key: str, what: str, where: str, store: FdStore | None) -> socket.socket:
    """``bind``, preferring the socket systemd kept for ``own.<key>``; the result is
    handed (back) to the store."""
    sock = None
    if store is not None:
        try:
            host, port = parse_listen(listen, key)
        except PortunusError:
            host, port = "", 0
        kept = store.adopt(f"own.{key}", "tcp", host, port)
        if kept:
            sock = kept[0]
            sock.setblocking(False)
    sock = sock or bind(listen, key, what, where)
    if store is not None:
        store.store(f"own.{key}", [sock])
    return sock
