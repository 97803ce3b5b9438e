"""Listening sockets kept by systemd across a restart (the file descriptor store).

Without it, ``systemctl restart`` (and so every package upgrade) refuses new
connections on every forwarded port for as long as the old process drains and
the new one starts: the last copy of each listener closes with the old process.
With ``FileDescriptorStoreMax=`` in the unit and ``PORTUNUS_FDSTORE=1`` in its
environment, the supervisor hands systemd a copy of every listening socket it
binds (``FDSTORE=1`` + ``FDNAME=<key>`` over ``$NOTIFY_SOCKET``, the fd attached
with SCM_RIGHTS) and withdraws it when the rule goes (``FDSTOREREMOVE=1``).
systemd keeps the copies while a restart job runs, so the kernel keeps queueing
connections in the very same sockets; the new supervisor gets them back
(``LISTEN_FDS``/``LISTEN_FDNAMES``, sd_listen_fds(3)) and adopts them instead of
binding, and the queued connections are accepted by its shards.

Names: ``<proto>/<port>`` for rule listeners, all of a port's SO_REUSEPORT sockets
(one per shard) in one message under one name; ``own.<key>`` for the API, metrics
and edge gateway listeners.  One datagram per port, not per socket: the notify
socket's queue is short, and a message that does not fit is dropped (logged), not
waited for.
"""

from __future__ import annotations

import array
import os
import socket

from portunus.logs import log_event

SD_LISTEN_FDS_START = 3


def enabled() -> bool:
    return os.environ.get("PORTUNUS_FDSTORE") == "1" and bool(os.environ.get("NOTIFY_SOCKET"))


def take_inherited() -> dict[str, list[socket.socket]]:
    """The sockets systemd passed to this process, by name (empty when none).

    Clears ``LISTEN_*`` so no child believes they are its own."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return {}
    out: dict[str, list[socket.socket]] = {}
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) else ""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        sock.set_inheritable(False)
        if not name:
            sock.close()  # unnamed: not ours to adopt
            continue
        out.setdefault(name, []).append(sock)
    if out:
        log_event("fdstore.inherited", names=len(out), sockets=sum(len(v) for v in out.values()))
    return out


class FdStore:
    """Adopts inherited listeners and keeps systemd's store in step with ours."""

    def __init__(self) -> None:
        self.active = enabled()
        self.inherited: dict[str, list[socket.socket]] = take_inherited() if self.active else {}
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr

    def adopt(
        self, name: str, proto: str, address: str, port: int, count: int = 1
    ) -> list[socket.socket]:
        """Up to ``count`` inherited sockets stored as ``name`` that still listen on
        ``address:port`` for ``proto``; the rest (a mismatch: the config changed;
        extra: fewer shards now) are closed.  The caller stores what it keeps."""
        socks = self.inherited.pop(name, [])
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        kept: list[socket.socket] = []
        for sock in socks:
            try:
                host, got_port = sock.getsockname()[:2]
                same = sock.type == kind and got_port == port and _same_host(host, address)
            except OSError:
                same = False
            if same and len(kept) < count:
                sock.setblocking(True)
                kept.append(sock)
            else:
                sock.close()
        if socks:
            self.remove(name)  # stored again, as they are now, by the caller
        return kept

    def store(self, name: str, socks: list[socket.socket]) -> None:
        self._send(f"FDSTORE=1\nFDNAME={name}", [s.fileno() for s in socks])

    def remove(self, name: str) -> None:
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])

    def drop_unclaimed(self) -> None:
        """After the first full rule set: inherited sockets no rule claimed (removed
        while we were down) are closed and withdrawn from the store."""
        for name, socks in list(self.inherited.items()):
            for sock in socks:
                sock.close()
            self.remove(name)
        if self.inherited:
            log_event("fdstore.dropped", sockets=len(self.inherited))
        self.inherited.clear()

    def _send(self, text: str, fds: list[int]) -> None:
        if not self.active or not self.addr:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                # Never block the supervisor's loop on systemd: a message that does
                # not fit now only costs this socket its place in the store.
                s.sendmsg([text.encode()], anc, socket.MSG_DONTWAIT, self.addr)
        except OSError as exc:
            log_event(
                "fdstore.failed", level="warning", message=text.splitlines()[0], error=str(exc)
            )


def _same_host(bound: str, wanted: str) -> bool:
    if bound == wanted:
        return True
    # "0.0.0.0" / "::" as configured vs what getsockname reports for them.
    return {bound, wanted} <= {"0.0.0.0", "::", "::ffff:0.0.0.0"}
