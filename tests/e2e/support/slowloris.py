"""Slow peers for the slowloris tests: many connections that start something (an
HTTP request header, a TLS ClientHello) and never finish it, or say nothing.

``SlowCrowd`` runs in a process of its own (so the attacker never competes with
the test's normal client for one interpreter lock).  It opens ``count``
non-blocking connections, each bound to one of ``sources`` before it connects
(several loopback addresses, so a per-source limit sees several peers), and
every ``tick_secs`` it sends the next byte of ``payload`` to each open one
(every ``silent_every``-th connection sends nothing) -- never the last byte.
It notes each connection the server closes: when, and the first bytes the
server said before (an error envelope, or nothing).  With ``reopen_per_tick``,
a closed connection is opened again (at most that many per tick) until
``stop_reopening``: an attacker that keeps its crowd up.

Also here: the fd headroom these tests need, a real ClientHello, and RSS
sampling of a server process.  Only loopback addresses are ever used.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import resource
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import psutil
import pytest

from .ports import LOOPBACK

MiB = 2**20


def fd_headroom(need: int) -> None:
    """Lift this process's soft RLIMIT_NOFILE to the hard one; skip when the hard
    limit is below ``need`` (the crowd's sockets plus the session's own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need} (raise it to run this test)")
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def loopback_sources(n: int) -> list[str]:
    """``n`` distinct loopback addresses, 127.0.1.1 onwards (127.0.0.0/8 is all
    loopback on Linux), for crowds that must not share one source address."""
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]


def client_hello(server_hostname: str) -> bytes:
    """The first flight OpenSSL sends for ``server_hostname`` (no server needed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname or None)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class RssSampler:
    """The peak RSS and fd count of one process, sampled every 50 ms in a thread,
    and the share of one CPU it used while sampled (``cpu``)."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.peak = proc.memory_info().rss
        self.peak_fds = proc.num_fds()
        self.cpu = 0.0
        self._cpu0 = self._cpu_secs()
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu_secs(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
                self.peak_fds = max(self.peak_fds, self.proc.num_fds())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(psutil.Error):
            self.cpu = (self._cpu_secs() - self._cpu0) / (time.monotonic() - self._t0)


def settled_rss(proc: psutil.Process) -> int:
    """RSS once two readings 0.3 s apart agree within 256 KiB."""
    last = proc.memory_info().rss
    for _ in range(30):
        time.sleep(0.3)
        now = proc.memory_info().rss
        if abs(now - last) < 256 * 1024:
            return now
        last = now
    return last


@dataclass
class _Params:
    port: int
    count: int
    payload: bytes
    sources: list[str]
    silent_every: int
    tick_secs: float
    reopen_per_tick: int


@dataclass
class _Shared:
    """What the crowd's process and the test share while the crowd runs."""

    opened: Any  # multiprocessing.Value("q"): connections opened, reopened ones included
    closed: Any  # connections the server closed (or refused)
    live: Any  # open now
    peak_open: Any
    reopen: Any  # multiprocessing.Event: open closed ones again
    stop: Any
    ready: Any

    @classmethod
    def make(cls, ctx: Any) -> _Shared:
        return cls(*(ctx.Value("q", 0) for _ in range(4)), ctx.Event(), ctx.Event(), ctx.Event())


class SlowCrowd:
    """The test's handle on a crowd running in its own process."""

    def __init__(
        self,
        port: int,
        count: int,
        *,
        payload: bytes = b"",
        sources: Sequence[str] = (LOOPBACK,),
        silent_every: int = 0,
        tick_secs: float = 0.25,
        reopen_per_tick: int = 0,
    ) -> None:
        self._params = _Params(
            port, count, payload, list(sources), silent_every, tick_secs, reopen_per_tick
        )
        ctx = multiprocessing.get_context("spawn")
        self._shared = _Shared.make(ctx)
        self._shared.reopen.set()
        self._ours, theirs = ctx.Pipe()
        self._proc = ctx.Process(
            target=_crowd_main, args=(self._params, self._shared, theirs), daemon=True
        )
        self.said: Counter[str] = Counter()  # first line the server said before closing
        self.held_secs: list[float] = []  # how long each closed one was open
        self._stopped = False

    @property
    def opened(self) -> int:
        return int(self._shared.opened.value)

    @property
    def closed(self) -> int:
        return int(self._shared.closed.value)

    @property
    def open_now(self) -> int:
        return int(self._shared.live.value)

    @property
    def peak_open(self) -> int:
        return int(self._shared.peak_open.value)

    def start(self, timeout: float = 30.0) -> SlowCrowd:
        """Open the whole crowd; return once every connection was attempted."""
        self._proc.start()
        started = time.monotonic()
        while not self._shared.ready.wait(0.1):
            assert self._proc.is_alive(), "the crowd's process died"
            assert time.monotonic() - started < timeout, "the crowd did not open in time"
        self._raise()
        return self

    def stop_reopening(self) -> None:
        self._shared.reopen.clear()

    def wait_all_closed(self, timeout: float) -> float:
        """Seconds until the server closed every connection still open; fails
        after ``timeout``."""
        started = time.monotonic()
        while self.open_now:
            self._raise()
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"{self.open_now} of the slow connections still open after {timeout} s"
                )
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        """End the crowd's process (it closes what is still open) and collect what
        the server said to each connection and how long each was held."""
        if self._stopped:
            return
        self._stopped = True
        self._shared.stop.set()
        if self._ours.poll(30):
            kind, payload = self._ours.recv()
            if kind == "error":
                raise AssertionError(f"the crowd's process failed: {payload}")
            self.said, self.held_secs = payload
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()

    def _raise(self) -> None:
        if self._ours.poll():
            kind, payload = self._ours.recv()
            if kind == "error":
                self._stopped = True
                raise AssertionError(f"the crowd's process failed: {payload}")


def _crowd_main(params: _Params, shared: _Shared, conn: Connection) -> None:
    crowd = _Crowd(params, shared)
    try:
        crowd.run()
    except BaseException as exc:  # reported to the test by SlowCrowd._raise
        conn.send(("error", repr(exc)))
        shared.ready.set()
        return
    finally:
        for slow in list(crowd.live.values()):
            slow.sock.close()
    conn.send(("done", (crowd.said, crowd.held_secs)))


class _Slow:
    __slots__ = ("sock", "sent", "opened", "said", "silent")

    def __init__(self, sock: socket.socket, silent: bool) -> None:
        self.sock = sock
        self.sent = 0
        self.opened = time.monotonic()
        self.said = b""
        self.silent = silent


@dataclass
class _Crowd:
    """The loop in the crowd's process."""

    p: _Params
    shared: _Shared
    live: dict[int, _Slow] = field(default_factory=dict)  # by fd
    said: Counter[str] = field(default_factory=Counter)
    held_secs: list[float] = field(default_factory=list)
    opened: int = 0

    def __post_init__(self) -> None:
        self._poll = select.poll()

    def run(self) -> None:
        self._open(self.p.count)
        self.shared.ready.set()
        next_tick = time.monotonic()
        while not self.shared.stop.is_set():
            self._reap(timeout_ms=20)
            if time.monotonic() >= next_tick:
                next_tick += self.p.tick_secs
                self._drip()
                if self.shared.reopen.is_set() and self.p.reopen_per_tick:
                    self._open(min(self.p.reopen_per_tick, self.p.count - len(self.live)))

    def _open(self, n: int) -> None:
        for _ in range(max(0, n)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind((self.p.sources[self.opened % len(self.p.sources)], 0))
            try:
                sock.connect((LOOPBACK, self.p.port))
            except BlockingIOError:
                pass
            silent = bool(self.p.silent_every) and self.opened % self.p.silent_every == 0
            self.opened += 1
            self.live[sock.fileno()] = _Slow(sock, silent)
            self._poll.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
            if self.opened % 200 == 0:
                # Let the server drain its accept queue (a full backlog drops SYNs
                # and the kernel retries them only after a second).
                self._reap(timeout_ms=20)
        self._publish()

    def _publish(self) -> None:
        self.shared.opened.value = self.opened
        self.shared.live.value = len(self.live)
        self.shared.peak_open.value = max(self.shared.peak_open.value, len(self.live))

    def _drip(self) -> None:
        payload = self.p.payload
        for slow in list(self.live.values()):
            if slow.silent or slow.sent >= len(payload) - 1:
                continue
            try:
                slow.sent += slow.sock.send(payload[slow.sent : slow.sent + 1])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                if exc.errno not in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET):
                    raise

    def _reap(self, timeout_ms: int) -> None:
        for fd, _ in self._poll.poll(timeout_ms):
            slow = self.live.get(fd)
            if slow is None:
                continue
            while True:
                try:
                    chunk = slow.sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    break  # still open
                except OSError:
                    chunk = b""  # reset, or the connect was refused
                if chunk:
                    slow.said = (slow.said + chunk)[:512]
                    continue
                self._closed(fd, slow)
                break
        self._publish()

    def _closed(self, fd: int, slow: _Slow) -> None:
        self._poll.unregister(fd)
        del self.live[fd]
        slow.sock.close()
        self.shared.closed.value += 1
        self.held_secs.append(time.monotonic() - slow.opened)
        first = slow.said.split(b"\r\n", 1)[0].decode("latin-1") if slow.said else "(nothing)"
        self.said[first] += 1
