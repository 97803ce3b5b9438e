"""The gateway's listening sockets and accept loop, with admission before TLS.

We accept ourselves (``loop.sock_accept``) instead of letting an asyncio server
do it, for two reasons.  A connection over the anonymous limits must be refused
before any TLS work, and an ``ssl=`` server only shows a connection after its
handshake.  And starting TLS later on a plain stream (``StreamWriter.start_tls``)
loses the ClientHello under uvloop, which starts reading the moment the
transport exists.  An accepted socket handed to ``loop.connect_accepted_socket``
has read nothing yet, so its TLS layer sees every byte.

A refused socket is closed with ``SO_LINGER`` 0: a reset, no TIME_WAIT, no
object beyond the accepted socket itself.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable

from portunus.control.fleet.preauth import PreauthLimits, PreauthSlot
from portunus.logs import log_throttled

# Connections the kernel queues while the loop is busy; a flood refused after
# accept must not also crowd out a real client's SYN.
BACKLOG = 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
# Out of fds or kernel memory: wait this long before accepting again, or the
# accept loop would spin on the same error.
_ACCEPT_BACKOFF_SECS = 0.1
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

OnAdmitted = Callable[[socket.socket, str | None, PreauthSlot], None]


def format_peer(addr: object) -> str | None:
    """``host:port`` / ``[v6]:port`` of a socket address (for logs and link info)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return None


def bind(host: str, port: int) -> list[socket.socket]:
    """One listening socket per address ``host`` resolves to, as
    ``asyncio.start_server`` binds them (SO_REUSEADDR, IPv6 sockets v6-only)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    chosen = port
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Port 0: every address gets the port the first one was given.
            sock.bind((addr[0], chosen, *addr[2:]))
            sock.listen(BACKLOG)
            sock.setblocking(False)
            chosen = sock.getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def refuse(conn: socket.socket) -> None:
    """Close ``conn`` with a reset: nothing read, nothing kept."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    conn.close()


async def accept_loop(sock: socket.socket, limits: PreauthLimits, on_admitted: OnAdmitted) -> None:
    """Accept until cancelled; refuse over the limits, else hand the socket on."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            conn, addr = await loop.sock_accept(sock)
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                log_throttled("edge.accept_failed", level="error", error=exc.strerror or str(exc))
                await asyncio.sleep(_ACCEPT_BACKOFF_SECS)
            continue
        peer = format_peer(addr)
        slot = limits.admit(str(addr[0]) if isinstance(addr, tuple) and addr else "?")
        if isinstance(slot, str):
            refuse(conn)
            limits.refused(slot, peer)
            continue
        on_admitted(conn, peer, slot)
