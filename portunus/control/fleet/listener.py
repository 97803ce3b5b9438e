"""The gateway's listening sockets and accept loop, with admission before TLS.

We accept ourselves (``loop.sock_accept``) instead of letting an asyncio server
do it, for two reasons.  A connection over the anonymous limits must be refused
before any TLS work, and an ``ssl=`` server only shows a connection after its
handshake.  And starting TLS later on a plain stream (``StreamWriter.start_tls``)
loses the ClientHello under uvloop, which starts reading the moment the
transport exists.  An accepted socket handed to the gateway's TLS transport
(``tls_transport.start_tls_server``) has read nothing yet, so TLS sees every byte.

At the global anonymous limit a new connection takes the slot of the one that has
waited longest for its handshake (``preauth``); the listen backlog (``BACKLOG``) is
large so a reconnect storm's SYNs wait in the kernel while the loop is busy.

A connection over its source's quota (a fleet behind one NAT address, or one
flooding peer) waits in ``Parking``: accepted, nothing read, no TLS, until a
slot of that source is released, in arrival order.  It is reset when the
parking lot is full (``park_capacity``: ``PARK_MAX``, or half the process's
file descriptors when that is less) or it waited longer than ``max_wait``
(``edge_preauth_park_secs``, 25 s by default: inside an edge client's 30 s
connect budget, so a parked client is still there when its turn comes).  The
lot is sized for a fleet's restart storm: reset instead, the surplus comes back
on its clients' backoff in synchronized waves, and the gateway idles between
them.  A refused socket is closed with ``SO_LINGER`` 0: a reset, no TIME_WAIT,
no object beyond the accepted socket itself.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

from portunus.control.fleet.preauth import PreauthLimits, PreauthSlot
from portunus.logs import log_throttled

# Connections the kernel queues while the loop is busy or the anonymous limit is
# full (the kernel caps it at net.core.somaxconn, 4096 by default since Linux 5.4).
# A fleet reconnecting at once waits here; a SYN beyond it is dropped and retried
# by the client's kernel.
BACKLOG = 16384
_LINGER_RESET = struct.pack("ii", 1, 0)
# Out of fds or kernel memory: wait this long before accepting again, or the
# accept loop would spin on the same error.
_ACCEPT_BACKOFF_SECS = 0.1
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Connections waiting for their source's quota, all sources together: each holds an
# fd, a queue entry and the kernel's socket (~1.3 KiB with its unread ClientHello),
# none of them TLS state: 16,384 parked cost ~21 MiB, mostly kernel memory.  Enough
# for a fleet of 10,000 behind one address to wait out a restart storm in one pass.
PARK_MAX = 16384


def park_capacity(nofile: int | None = None) -> int:
    """How many connections may be parked: ``PARK_MAX``, or half the file
    descriptors this process may open (``RLIMIT_NOFILE``, soft) when that is less,
    so parked sockets never take the fds the authenticated links need."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY or nofile < 0:
        return PARK_MAX
    return max(1, min(PARK_MAX, nofile // 2))


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


class Parking:
    """Accepted connections waiting for a slot of their source (FIFO per source)."""

    def __init__(
        self,
        limits: PreauthLimits,
        on_admitted: OnAdmitted,
        max_wait: float,
        max_parked: int = PARK_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.on_admitted = on_admitted
        self.max_wait = max_wait
        self.max_parked = max_parked
        self.clock = clock
        self.count = 0
        self._queues: dict[str, deque[tuple[socket.socket, str | None, float]]] = {}
        limits.on_release = self._released

    def park(self, source: str, conn: socket.socket, peer: str | None) -> bool:
        """Keep ``conn`` until ``source`` has a free slot; False when the lot is full."""
        if self.count >= self.max_parked:
            return False
        self._queues.setdefault(source, deque()).append((conn, peer, self.clock()))
        self.count += 1
        return True

    def _released(self, source: str) -> None:
        queue = self._queues.get(source)
        while queue:
            conn, peer, parked_at = queue.popleft()
            self.count -= 1
            if self.clock() - parked_at > self.max_wait:
                self._expire(conn, peer)
                continue
            slot = self.limits.admit(source)
            if isinstance(slot, str):  # the global limit is full: wait for the next release
                queue.appendleft((conn, peer, parked_at))
                self.count += 1
                return
            self.on_admitted(conn, peer, slot)
            break
        if queue is not None and not queue:
            del self._queues[source]

    def expire(self) -> None:
        """Reset every connection parked longer than ``max_wait`` (its client has
        given up its connect by then); called about once a second."""
        now = self.clock()
        for source in list(self._queues):
            queue = self._queues[source]
            while queue and now - queue[0][2] > self.max_wait:
                conn, peer, _ = queue.popleft()
                self.count -= 1
                self._expire(conn, peer)
            if not queue:
                del self._queues[source]

    def _expire(self, conn: socket.socket, peer: str | None) -> None:
        refuse(conn)
        self.limits.refused("max_per_source", peer, parked_secs=self.max_wait)

    def close(self) -> None:
        for queue in self._queues.values():
            for conn, _, _ in queue:
                refuse(conn)
        self._queues.clear()
        self.count = 0


async def accept_loop(
    sock: socket.socket,
    limits: PreauthLimits,
    on_admitted: OnAdmitted,
    parking: Parking | None = None,
) -> None:
    """Accept until cancelled; over a source's quota park the socket (reset when the
    lot is full), over the global limit with nothing to reclaim reset it, else hand
    it on."""
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
        source = str(addr[0]) if isinstance(addr, tuple) and addr else "?"
        slot = limits.admit(source)
        if isinstance(slot, str):
            if (
                slot == "max_per_source"
                and parking is not None
                and parking.park(source, conn, peer)
            ):
                continue
            refuse(conn)
            limits.refused(slot, peer)
            continue
        on_admitted(conn, peer, slot)
