"""Loopback ports for the processes under test: ``PortAllocator`` hands out ports no
other test (here or in a concurrent session) gets; ``listening_ports`` and
``connection_refused`` tell what is bound right now."""

from __future__ import annotations

import errno
import os
import random
import socket
import threading
import time

LOOPBACK = "127.0.0.1"


class PortAllocator:
    """Hands out ports on 127.0.0.1 that nobody else is using or will be given.

    Candidates come from ``[lo, hi)``, below the ephemeral range (32768+ on
    Linux) so outgoing connections never squat on them.  Each port handed out is
    reserved machine-wide for this process's lifetime with an abstract Unix socket
    name (freed by the kernel when the process dies, no files left behind), so
    concurrent test sessions never get the same port; it must also be bindable
    for TCP and UDP right now.
    """

    def __init__(self, lo: int = 20000, hi: int = 32000) -> None:
        self.lo, self.hi = lo, hi
        self._next = random.Random(os.getpid() ^ time.time_ns()).randrange(lo, hi)
        self._locks: list[socket.socket] = []
        self._mutex = threading.Lock()

    def _try(self, port: int) -> bool:
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lock.bind(f"\0portunus-e2e-port-{port}")
        except OSError:
            lock.close()
            return False
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as probe:
                try:
                    probe.bind((LOOPBACK, port))
                except OSError:
                    lock.close()
                    return False
        self._locks.append(lock)
        return True

    def port(self) -> int:
        with self._mutex:
            for _ in range(self.hi - self.lo):
                port = self._next
                self._next = self.lo + (self._next + 1 - self.lo) % (self.hi - self.lo)
                if self._try(port):
                    return port
        raise RuntimeError(f"no free port left in {self.lo}-{self.hi}")

    def ports(self, n: int) -> list[int]:
        return [self.port() for _ in range(n)]

    def block(self, n: int) -> int:
        """``n`` consecutive free ports (for range rules); returns the first."""
        with self._mutex:
            for _ in range(self.hi - self.lo):
                start = self._next
                self._next = self.lo + (self._next + n - self.lo) % (self.hi - self.lo)
                if start + n > self.hi:
                    continue
                taken: list[int] = []
                for p in range(start, start + n):
                    if not self._try(p):
                        break
                    taken.append(p)
                if len(taken) == n:
                    return start
                for _p in taken:  # give the partial block back
                    self._locks.pop().close()
        raise RuntimeError(f"no block of {n} free ports in {self.lo}-{self.hi}")

    def close(self) -> None:
        for lock in self._locks:
            lock.close()
        self._locks.clear()


def listening_ports(host: str = LOOPBACK) -> set[int]:
    """TCP ports in LISTEN on ``host`` (or the wildcard), from /proc/net/tcp."""
    want = {socket.inet_aton(host)[::-1].hex().upper(), "00000000"}
    out: set[int] = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            addr, port_hex = parts[1].split(":")
            if parts[3] == "0A" and addr in want:
                out.add(int(port_hex, 16))
    return out


def connection_refused(port: int, host: str = LOOPBACK) -> bool:
    """True if a connect to ``host:port`` is refused right now (nothing listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        err = s.connect_ex((host, port))
        return err == errno.ECONNREFUSED
