"""Listening sockets, owned by the supervisor for the lifetime of their rules.

For every port a rule needs, the supervisor binds one SO_REUSEPORT socket per
shard and keeps it open.  The kernel spreads connections (and UDP flows, by
4-tuple) across the group; a shard that dies leaves its socket's accept queue
intact in the supervisor, and its replacement is handed the very same fd, so no
connection attempt is refused while it restarts.  A rule's ports are bound all
or none.  Several rules may share a port (SNI), so sockets are refcounted.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

from portunus.rules import Rule
from portunus.supervisor.fdstore import FdStore

BACKLOG = 4096


class BindError(Exception):
    """A port of a rule could not be bound; ``reason`` is the operator-facing text."""

    def __init__(self, port: int, reason: str) -> None:
        super().__init__(reason)
        self.port = port
        self.reason = reason


def _bind_one(proto: str, address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and address == "::":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((address, port))
        if proto == "tcp":
            # Accepted sockets inherit it, even those queued before a shard has the
            # listener: one setsockopt per listener instead of one per connection.
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.listen(BACKLOG)
    except BaseException:
        s.close()
        raise
    return s


class ListenerTable:
    """key (``tcp/8080``) -> one socket per shard, with a refcount of rules."""

    def __init__(self, address: str, shards: int, store: FdStore | None = None) -> None:
        self.address = address
        self.shards = shards
        self.sockets: dict[str, list[socket.socket]] = {}
        self.refs: dict[str, int] = {}
        self.store = store  # systemd's fd store (fdstore.py), when the unit has one

    def acquire(self, rule: Rule) -> list[str]:
        """Bind every port of ``rule`` not yet bound; return the newly bound keys.

        All or none: on the first failure everything bound here is closed again.
        """
        new: dict[str, list[socket.socket]] = {}
        try:
            for port in rule.ports:
                key = f"{rule.protocol}/{port}"
                if key in self.sockets:
                    continue
                # Sockets systemd kept across our restart (fdstore.py) first: they
                # hold the connections that queued while we were down.
                socks = (
                    self.store.adopt(key, rule.protocol, self.address, port, self.shards)
                    if self.store
                    else []
                )
                new[key] = socks
                while len(socks) < self.shards:
                    try:
                        socks.append(_bind_one(rule.protocol, self.address, port))
                    except OSError as exc:
                        raise BindError(port, _reason(exc, port)) from None
        except BindError:
            for socks in new.values():
                for s in socks:
                    s.close()
            raise
        self.sockets.update(new)
        if self.store is not None:
            for key, socks in new.items():
                self.store.store(key, socks)
        for key in rule.listener_keys():
            self.refs[key] = self.refs.get(key, 0) + 1
        return list(new)

    def release(self, rule: Rule) -> list[str]:
        """Drop the rule's references; close and return keys nobody uses any more."""
        gone: list[str] = []
        for key in rule.listener_keys():
            left = self.refs.get(key, 0) - 1
            if left > 0:
                self.refs[key] = left
                continue
            self.refs.pop(key, None)
            for s in self.sockets.pop(key, []):
                s.close()
            if self.store is not None:
                self.store.remove(key)
            gone.append(key)
        return gone

    def fds_for_shard(self, index: int, keys: Iterable[str] | None = None) -> list[tuple[str, int]]:
        wanted = self.sockets.keys() if keys is None else keys
        return [(k, self.sockets[k][index].fileno()) for k in wanted if k in self.sockets]

    def all_sockets(self) -> list[socket.socket]:
        return [s for socks in self.sockets.values() for s in socks]

    def close_all(self) -> None:
        for socks in self.sockets.values():
            for s in socks:
                s.close()
        self.sockets.clear()
        self.refs.clear()


def _reason(exc: OSError, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port_in_use (port {port} already bound)"
    if exc.errno == errno.EACCES:
        return f"permission_denied (port {port} needs CAP_NET_BIND_SERVICE or root)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"address_not_available (listen_address cannot be bound for port {port})"
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return f"too_many_open_files (port {port}: raise LimitNOFILE)"
    return f"bind_failed (port {port}: {exc.strerror})"
