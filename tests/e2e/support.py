"""Shared machinery for end-to-end tests that run the real Portunus processes.

Everything here binds 127.0.0.1 only.  The pieces:

- ``wait_for``: poll a condition instead of sleeping blindly.
- ``PortAllocator``: ports for listeners that no other test (in this session or
  a concurrent one on the same machine) is handed, taken from below the kernel's
  ephemeral range so client source ports never collide with them.
- ``Origin``: a TCP origin server in background threads with pluggable
  per-connection handlers (``echo``, ``sink``, ``source``, ``duplex``, ...); every
  connection's byte counts and SHA-256 are recorded.
- ``Pattern`` / ``Digest``: reproducible payloads and their checksums.
- ``Metrics`` / ``scrape``: a Prometheus scrape summed by name and label subset.
- ``ManagedProc``: a process started in its own session with stderr captured to
  a file, JSON log parsing, children by process title, and a teardown that kills
  the whole process group.  ``StandaloneProc`` adds the TOML file and reload.

Nothing here is standalone-specific except ``StandaloneProc``; a server fixture
can subclass ``ManagedProc`` the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil

LOOPBACK = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent
# PORTUNUS_E2E_STANDALONE runs the suite against another build (an installed package, a patched tree).
STANDALONE_BIN = os.environ.get("PORTUNUS_E2E_STANDALONE") or str(VENV_BIN / "portunus-standalone")
KiB = 1024
MiB = 1024 * 1024

T = TypeVar("T")


# ------------------------------------------------------------------ polling


def wait_for(cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
             what: str | Callable[[], str] = "condition") -> T:
    """Poll ``cond`` until it returns something truthy and return that value.

    Exceptions from ``cond`` count as "not yet" (a port not listening yet, a
    scrape refused); the last one is reported if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except (OSError, AssertionError, ValueError, KeyError, psutil.Error) as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            label = what() if callable(what) else what
            extra = f" (last error: {last_exc!r})" if last_exc is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {label}{extra}")
        time.sleep(interval)


# -------------------------------------------------------------------- ports


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


# ------------------------------------------------------------------ payloads


class Digest:
    """Running byte count and SHA-256 of a stream."""

    __slots__ = ("count", "h")

    def __init__(self) -> None:
        self.count = 0
        self.h = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        self.count += len(data)
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


class Pattern:
    """A reproducible pseudo-random payload of ``size`` bytes (no period that a
    relay could hide a dropped, duplicated or reordered chunk behind)."""

    def __init__(self, size: int, seed: int = 1, chunk: int = 256 * KiB) -> None:
        self.size = size
        self.seed = seed
        self.chunk = chunk

    def chunks(self) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        left = self.size
        while left > 0:
            n = min(self.chunk, left)
            left -= n
            yield rng.randbytes(n)

    def digest(self) -> str:
        d = Digest()
        for c in self.chunks():
            d.update(c)
        return d.hexdigest()


def send_pattern(sock: socket.socket, pattern: Pattern, digest: Digest | None = None) -> Digest:
    """sendall every chunk of ``pattern``; returns the digest of what was sent."""
    d = digest or Digest()
    for chunk in pattern.chunks():
        sock.sendall(chunk)
        d.update(chunk)
    return d


def recv_all(sock: socket.socket, digest: Digest | None = None, limit: int | None = None,
             bufsize: int = 256 * KiB) -> Digest:
    """Read until EOF (or ``limit`` bytes) into a digest."""
    d = digest or Digest()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    while limit is None or d.count < limit:
        want = bufsize if limit is None else min(bufsize, limit - d.count)
        n = sock.recv_into(view[:want])
        if n == 0:
            break
        d.update(view[:n])
    return d


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes or raise EOFError."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def connect(port: int, timeout: float = 5.0, host: str = LOOPBACK,
            rcvbuf: int | None = None) -> socket.socket:
    """A blocking client socket connected to ``host:port``."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def connection_refused(port: int, host: str = LOOPBACK) -> bool:
    """True if a connect to ``host:port`` is refused right now (nothing listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        err = s.connect_ex((host, port))
        return err == errno.ECONNREFUSED


def echo_roundtrip(port: int, payload: bytes = b"ping\n", timeout: float = 5.0) -> bool:
    """Connect, send ``payload``, expect it echoed back; True when it was."""
    with connect(port, timeout) as s:
        s.sendall(payload)
        return recv_exact(s, len(payload)) == payload


# ------------------------------------------------------------------- origin


class ConnRecord:
    """What one origin connection saw: counts and checksums both ways."""

    __slots__ = ("rx", "tx", "peer", "error", "done", "sock", "extra")

    def __init__(self, sock: socket.socket, peer: Any) -> None:
        self.rx = Digest()
        self.tx = Digest()
        self.peer = peer
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.sock = sock
        self.extra: dict[str, Any] = {}


Handler = Callable[[socket.socket, ConnRecord], None]


class Origin:
    """A TCP server on 127.0.0.1 running ``handler`` in one thread per connection.

    ``records`` lists every connection in accept order.  ``close`` stops accepting,
    shuts down every open connection (which unblocks the handlers) and joins.
    """

    def __init__(self, handler: Handler, port: int = 0, backlog: int = 1024) -> None:
        self.handler = handler
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((LOOPBACK, port))
        self.lsock.listen(backlog)
        self.lsock.settimeout(0.1)
        self.port: int = self.lsock.getsockname()[1]
        self.records: list[ConnRecord] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"origin-{self.port}", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            rec = ConnRecord(conn, peer)
            t = threading.Thread(target=self._run, args=(conn, rec), daemon=True)
            with self._lock:
                self.records.append(rec)
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _run(self, conn: socket.socket, rec: ConnRecord) -> None:
        try:
            self.handler(conn, rec)
        except BaseException as exc:  # noqa: BLE001 - record, never raise in a thread
            rec.error = exc
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            rec.done.set()

    def wait_connections(self, n: int, timeout: float = 10.0) -> list[ConnRecord]:
        wait_for(lambda: len(self.records) >= n, timeout, what=f"{n} origin connection(s) on {self.port}")
        return self.records[:n]

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.lsock.close()
        self._acceptor.join(5)
        with self._lock:
            records = list(self.records)
            threads = list(self._threads)
        for rec in records:
            if not rec.done.is_set():
                with contextlib.suppress(OSError):
                    rec.sock.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(5)

    def __enter__(self) -> Origin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo(conn: socket.socket, rec: ConnRecord) -> None:
    """Echo everything; pass the client's half-close on."""
    buf = bytearray(256 * KiB)
    view = memoryview(buf)
    while n := conn.recv_into(buf):
        rec.rx.update(view[:n])
        conn.sendall(view[:n])
        rec.tx.update(view[:n])
    conn.shutdown(socket.SHUT_WR)


def sink(reply: Pattern | None = None) -> Handler:
    """Read to EOF (checksummed); only then send ``reply`` and close."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        recv_all(conn, rec.rx)
        rec.extra["eof_at"] = time.monotonic()
        if reply is not None:
            send_pattern(conn, reply, rec.tx)
        conn.shutdown(socket.SHUT_WR)

    return handler


def source(pattern: Pattern, then_read: bool = True) -> Handler:
    """Send ``pattern`` right away, half-close, then read to EOF."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        send_pattern(conn, pattern, rec.tx)
        conn.shutdown(socket.SHUT_WR)
        if then_read:
            recv_all(conn, rec.rx)

    return handler


def duplex(pattern: Pattern) -> Handler:
    """Send ``pattern`` while reading to EOF at the same time (full duplex)."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        errors: list[BaseException] = []

        def push() -> None:
            try:
                send_pattern(conn, pattern, rec.tx)
                conn.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=push, daemon=True)
        t.start()
        recv_all(conn, rec.rx)
        t.join()
        if errors:
            raise errors[0]

    return handler


REQUEST = struct.Struct("!QQI")  # token, bytes the origin must send back, pattern seed


def request_header(token: int, reply_size: int, seed: int) -> bytes:
    return REQUEST.pack(token, reply_size, seed)


def duplex_on_request(conn: socket.socket, rec: ConnRecord) -> None:
    """The client states what it wants in a ``REQUEST`` header; the origin then
    streams that many pattern bytes back while reading the client's payload to EOF.
    One origin serves every size; ``rec.extra["token"]`` ties the record to a test."""
    token, size, seed = REQUEST.unpack(recv_exact(conn, REQUEST.size))
    rec.extra["token"] = token
    duplex(Pattern(size, seed))(conn, rec)


def client_duplex(port: int, send: Pattern, reply: Pattern, token: int,
                  timeout: float = 60.0) -> tuple[Digest, Digest]:
    """Client side of ``duplex_on_request``: send ``send`` while receiving the
    reply, both at once; returns (sent, received) digests (header excluded)."""
    with connect(port, timeout) as s:
        s.sendall(request_header(token, reply.size, reply.seed))
        sent = Digest()
        errors: list[BaseException] = []

        def push() -> None:
            try:
                send_pattern(s, send, sent)
                s.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=push, daemon=True)
        t.start()
        received = recv_all(s)
        t.join(timeout)
        if errors:
            raise errors[0]
        return sent, received


def exchange(n_in: int, reply: Pattern) -> Handler:
    """Read exactly ``n_in`` bytes, answer with ``reply``, then wait for EOF: the
    connection stays open (for as long as the client keeps it) after both moved."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        recv_all(conn, rec.rx, limit=n_in)
        send_pattern(conn, reply, rec.tx)
        recv_all(conn, rec.rx)

    return handler


def slow_source(pattern: Pattern, interval: float) -> Handler:
    """Send ``pattern`` one chunk every ``interval`` seconds, then close."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        for i, chunk in enumerate(pattern.chunks()):
            if i:
                time.sleep(interval)
            conn.sendall(chunk)
            rec.tx.update(chunk)
        conn.shutdown(socket.SHUT_WR)
        recv_all(conn, rec.rx)

    return handler


def push_forever(chunk: int = 64 * KiB) -> Handler:
    """Send until the peer goes away; ``rec.tx.count`` shows how far it got."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        data = random.Random(7).randbytes(chunk)
        with contextlib.suppress(OSError):
            while True:
                conn.sendall(data)
                rec.tx.count += len(data)

    return handler


# ------------------------------------------------------------------ metrics


class Metrics:
    """One scrape: samples by name, summed over every sample whose labels
    include the given ones (so ``value("x_total", rule="a")`` sums shards, owners...)."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))

    def value(self, name: str, default: float = 0.0, **labels: str) -> float:
        found = [v for lab, v in self.samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
        return sum(found) if found else default

    def has(self, name: str, **labels: str) -> bool:
        return any(all(lab.get(k) == w for k, w in labels.items()) for lab, _ in self.samples.get(name, []))

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [lab for lab, _ in self.samples.get(name, [])]


def multiproc_value(db_file: str | Path, name: str, **labels: str) -> float:
    """Sum of ``name`` in one prometheus multiprocess file (``counter_<pid>.db``):
    what one process contributed to a scrape."""
    from prometheus_client.multiprocess import MultiProcessCollector

    total = 0.0
    for family in MultiProcessCollector.merge([str(db_file)], accumulate=True):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += float(s.value)
    return total


def scrape(url: str, timeout: float = 5.0) -> Metrics:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        if resp.status != 200:
            raise OSError(f"{url} answered {resp.status}")
        return Metrics(resp.read().decode())


# -------------------------------------------------------------------- TOML


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def standalone_toml(settings: dict[str, Any], rules: Iterable[dict[str, Any]]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    for rule in rules:
        lines += ["", "[[rule]]"] + [f"{k} = {toml_value(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------- processes


def title_of(p: psutil.Process) -> str:
    return " ".join(p.cmdline()).strip()


def pipe_fds(pid: int) -> int:
    """How many pipe fds ``pid`` holds (the splice path keeps one pipe per direction)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                n += 1
    return n


class ManagedProc:
    """A Portunus process tree under test.

    Started in a new session (its own process group), so ``kill_tree`` reaches
    every descendant even if the root already died and they were re-parented.
    stderr (the JSON log) and stdout go to files under ``workdir``.
    """

    def __init__(self, argv: list[str], *, workdir: Path, env: dict[str, str] | None = None,
                 name: str = "proc") -> None:
        self.argv = argv
        self.workdir = workdir
        self.name = name
        self.env = dict(env if env is not None else os.environ)
        self.stderr_path = workdir / f"{name}.stderr"
        self.stdout_path = workdir / f"{name}.stdout"
        self.proc: subprocess.Popen[bytes] | None = None
        self.known_pids: set[int] = set()

    # ---- lifecycle

    def start(self) -> None:
        with open(self.stderr_path, "ab") as err, open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.env,
                cwd=self.workdir, start_new_session=True,
            )
        self.known_pids.add(self.proc.pid)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) still running after {timeout}s\n"
                                 + self.stderr_tail()) from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the root and wait for it to exit; returns its exit code."""
        if not self.alive():
            assert self.proc is not None
            return self.proc.returncode
        self.send_signal(sig)
        return self.wait_exit(timeout)

    def kill_tree(self) -> None:
        """SIGKILL every process of the tree (process group + known descendants)."""
        if self.proc is None:
            return
        victims: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            victims = psutil.Process(self.proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.kill()
        for pid in self.known_pids - {self.proc.pid}:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE and title_of(p).startswith("portunus"):
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    # ---- process tree

    def children(self) -> list[psutil.Process]:
        """Live direct children (zombies excluded)."""
        out: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            for c in psutil.Process(self.pid).children():
                with contextlib.suppress(psutil.Error):
                    if c.status() != psutil.STATUS_ZOMBIE:
                        out.append(c)
                        self.known_pids.add(c.pid)
        return out

    def titled(self) -> dict[str, psutil.Process]:
        """Direct children by process title (``portunus: shard 0`` -> process)."""
        out: dict[str, psutil.Process] = {}
        for c in self.children():
            with contextlib.suppress(psutil.Error):
                out[title_of(c)] = c
        return out

    def shards(self) -> dict[int, psutil.Process]:
        """Shard index -> process, from the ``portunus: shard N`` titles."""
        out: dict[int, psutil.Process] = {}
        for title, p in self.titled().items():
            if title.startswith("portunus: shard "):
                out[int(title.split()[-1])] = p
        return out

    def shard_rss(self) -> int:
        return sum(p.memory_info().rss for p in self.shards().values())

    # ---- logs

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_tail(self, lines: int = 40) -> str:
        tail = self.stderr_text().splitlines()[-lines:]
        return f"--- last {len(tail)} stderr lines of {self.name} ---\n" + "\n".join(tail)

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log record written so far, in order."""
        out: list[dict[str, Any]] = []
        for line in self.stderr_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def log_mark(self) -> int:
        return len(self.logs())

    def events(self, event: str, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in self.logs()[since:]
                if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())]

    def wait_log(self, event: str | tuple[str, ...], since: int = 0, timeout: float = 10.0,
                 **fields: Any) -> dict[str, Any]:
        """Wait for a log record with ``event`` (one of, if a tuple) written after
        record number ``since``; return it."""
        names = (event,) if isinstance(event, str) else event

        def found() -> dict[str, Any] | None:
            for r in self.logs()[since:]:
                if r.get("event") in names and all(r.get(k) == v for k, v in fields.items()):
                    return r
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.proc.returncode if self.proc else '?'})")
            return None

        return wait_for(found, timeout, what=lambda: f"log event {names} from {self.name}\n" + self.stderr_tail())


class StandaloneProc(ManagedProc):
    """``portunus-standalone --config F [--shards N]`` with its TOML written for it."""

    def __init__(self, *, workdir: Path, metrics_port: int, rules: list[dict[str, Any]],
                 settings: dict[str, Any] | None = None, shards: int = 1,
                 env: dict[str, str] | None = None, name: str = "standalone") -> None:
        self.config_path = workdir / f"{name}.toml"
        self.metrics_port = metrics_port
        self.shard_count = shards
        self.settings: dict[str, Any] = {
            "listen_address": LOOPBACK,
            "metrics_listen": f"{LOOPBACK}:{metrics_port}",
            "log_format": "json",
            "shutdown_drain_timeout_secs": 5,
        }
        self.settings.update(settings or {})
        self.rules = list(rules)
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "PORTUNUS_NO_SPLICE")}
        full_env["PORTUNUS_RUNTIME_DIR"] = str(workdir / f"{name}-run")
        full_env.update(env or {})
        argv = [STANDALONE_BIN, "--config", str(self.config_path), "--shards", str(shards)]
        super().__init__(argv, workdir=workdir, env=full_env, name=name)
        self.write_config()

    @property
    def metrics_dir(self) -> Path:
        """The PROMETHEUS_MULTIPROC_DIR the supervisor prepared."""
        return Path(self.env["PORTUNUS_RUNTIME_DIR"]) / "metrics"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def write_config(self, rules: list[dict[str, Any]] | None = None,
                     settings: dict[str, Any] | None = None) -> None:
        if rules is not None:
            self.rules = list(rules)
        if settings is not None:
            self.settings.update(settings)
        self.write_raw(standalone_toml(self.settings, self.rules))

    def write_raw(self, text: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def rule_ports(self) -> list[int]:
        ports: list[int] = []
        for r in self.rules:
            if r.get("protocol", "tcp") != "tcp":
                continue
            if "listen_port" in r:
                ports.append(int(r["listen_port"]))
            elif "listen_ports" in r:
                lo, _, hi = str(r["listen_ports"]).partition("-")
                ports.extend(range(int(lo), int(hi or lo) + 1))
        return ports

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Ready = the supervisor logged ``supervisor.ready``, every shard runs under
        its title, /metrics answers and every TCP rule port is in LISTEN."""
        self.wait_log("supervisor.ready", timeout=timeout)
        wait_for(lambda: len(self.shards()) == self.shard_count, timeout,
                 what=lambda: f"{self.shard_count} shard process(es)\n" + self.stderr_tail())
        wait_for(lambda: self.scrape() is not None, timeout,
                 what=lambda: f"{self.metrics_url} to answer\n" + self.stderr_tail())
        for port in self.rule_ports():
            wait_for(lambda p=port: p in listening_ports(), timeout, what=f"port {port} in LISTEN")

    def scrape(self) -> Metrics:
        return scrape(self.metrics_url)

    def reload(self, expect: str | tuple[str, ...] = "config.reloaded", timeout: float = 10.0) -> dict[str, Any]:
        """SIGHUP and wait for the reload's outcome in the log (``config.reloaded``
        or ``config.invalid``); returns that record."""
        mark = self.log_mark()
        self.send_signal(signal.SIGHUP)
        outcome = ("config.reloaded", "config.invalid")
        rec = self.wait_log(outcome, since=mark, timeout=timeout)
        wanted = (expect,) if isinstance(expect, str) else expect
        assert rec["event"] in wanted, f"reload gave {rec}\n{self.stderr_tail()}"
        return rec


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


class StandaloneFactory:
    """Starts StandaloneProcs in ``workdir`` and kills every one at ``close``."""

    def __init__(self, workdir: Path, ports: PortAllocator) -> None:
        self.workdir = workdir
        self.ports = ports
        self.procs: list[StandaloneProc] = []

    def __call__(self, rules: list[dict[str, Any]], *, shards: int = 1,
                 settings: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 splice: bool = True, ready: bool = True) -> StandaloneProc:
        extra_env = dict(env or {})
        if not splice:
            extra_env["PORTUNUS_NO_SPLICE"] = "1"
        proc = StandaloneProc(workdir=self.workdir, metrics_port=self.ports.port(), rules=rules,
                              settings=settings, shards=shards, env=extra_env,
                              name=f"standalone{len(self.procs)}")
        self.procs.append(proc)
        proc.start()
        if ready:
            proc.wait_ready()
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                sys.stdout.write(proc.stderr_tail() + "\n")  # shown by pytest on failure
            proc.kill_tree()
        self.procs.clear()


# ------------------------------------------------------------------- server

# PORTUNUS_E2E_SERVER runs the server tests against another build of portunus-server.
SERVER_BIN = os.environ.get("PORTUNUS_E2E_SERVER") or str(VENV_BIN / "portunus-server")
# Inherited variables that would point a server or CLI under test at the wrong place.
_SERVER_ENV_DROP = (
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "PORTUNUS_NO_SPLICE", "PORTUNUS_OPERATOR_TOKEN",
    "PORTUNUS_DATA_DIR", "PORTUNUS_CONFIG", "PORTUNUS_SOCKET", "PORTUNUS_TOKEN_FILE", "PORTUNUS_RUNTIME_DIR",
)


class _Default:
    """Marker for "use the server's operator token" in ``ServerProc`` helpers."""

    def __repr__(self) -> str:
        return "OPERATOR_TOKEN"


OPERATOR_TOKEN: Any = _Default()


class ApiResponse:
    """One HTTP answer: ``status``, lower-cased ``headers``, raw ``body``; ``json()``
    parses it and ``error_code`` reads the contract's error envelope."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str | None:
        try:
            doc = self.json()
        except ValueError:
            return None
        err = doc.get("error") if isinstance(doc, dict) else None
        return err.get("code") if isinstance(err, dict) else None

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


class ServerProc(ManagedProc):
    """``portunus-server --data-dir D serve --shards N`` with D/server.toml written
    for loopback: forwarded ports on 127.0.0.1, the API, metrics and edge gateway on
    free loopback ports, JSON logs, a short drain.

    The runtime dir (control.sock) is a short private directory under /tmp passed as
    ``PORTUNUS_RUNTIME_DIR`` (a pytest tmp path can exceed the 108-byte limit of a
    Unix socket path); ``cli`` passes the same environment, so the CLI finds it.
    ``start`` may be called again after ``stop`` (a restart keeps D and the ports);
    the stderr log is appended to, so ``log_mark`` separates the runs.
    """

    def __init__(self, *, workdir: Path, data_dir: Path, ports: PortAllocator,
                 settings: dict[str, Any] | None = None, shards: int = 1,
                 env: dict[str, str] | None = None, name: str = "server") -> None:
        self.data_dir = data_dir
        self.shard_count = shards
        self.api_port, self.metrics_port, self.control_port = ports.ports(3)
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="ptn-run-", dir="/tmp"))
        self.config_path = data_dir / "server.toml"
        self.settings: dict[str, Any] = {
            "listen_address": LOOPBACK,
            "operator_http_listen": f"{LOOPBACK}:{self.api_port}",
            "metrics_listen": f"{LOOPBACK}:{self.metrics_port}",
            "control_listen": f"{LOOPBACK}:{self.control_port}",
            "log_format": "json",
            "shutdown_drain_timeout_secs": 2,
        }
        self.settings.update(settings or {})
        full_env = {k: v for k, v in os.environ.items() if k not in _SERVER_ENV_DROP}
        full_env["PORTUNUS_RUNTIME_DIR"] = str(self.runtime_dir)
        full_env.update(env or {})
        argv = [SERVER_BIN, "--data-dir", str(data_dir), "serve", "--shards", str(shards)]
        super().__init__(argv, workdir=workdir, env=full_env, name=name)
        self.start_mark = 0
        data_dir.mkdir(parents=True, exist_ok=True)
        self.write_config()

    # ---- files and addresses

    def write_config(self, settings: dict[str, Any] | None = None) -> None:
        """(Re)write D/server.toml; takes effect at the next start."""
        if settings is not None:
            self.settings.update(settings)
        self.config_path.write_text(standalone_toml(self.settings, []))

    @property
    def token(self) -> str:
        """The operator token ``serve`` wrote to D/operator.token on first start."""
        if isinstance(self.settings.get("operator_token"), str):
            return str(self.settings["operator_token"])
        return (self.data_dir / "operator.token").read_text().strip()

    @property
    def db_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def socket_path(self) -> str:
        return str(self.runtime_dir / "control.sock")

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    # ---- lifecycle

    def start(self) -> None:
        self.start_mark = self.log_mark()
        super().start()

    def health_ok(self) -> bool:
        """True when ``GET /v1/health`` answers 200 right now."""
        try:
            return self.http("GET", "/v1/health", token=None, timeout=2.0).status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Ready = ``supervisor.ready`` logged by this run, every shard running under
        its title, control and web running, and /v1/health answering 200."""
        self.wait_log("supervisor.ready", since=self.start_mark, timeout=timeout)
        wait_for(lambda: len(self.shards()) == self.shard_count, timeout,
                 what=lambda: f"{self.shard_count} shard process(es)\n" + self.stderr_tail())
        wait_for(lambda: self.child("control") and self.child("web"), timeout,
                 what=lambda: "control and web processes\n" + self.stderr_tail())
        wait_for(self.health_ok, timeout, what=lambda: "/v1/health 200\n" + self.stderr_tail())

    def restart(self, timeout: float = 20.0) -> None:
        """SIGTERM, expect exit 0, start again on the same data dir and wait until ready."""
        rc = self.stop(signal.SIGTERM, timeout=timeout)
        assert rc == 0, f"serve exited {rc} on SIGTERM\n{self.stderr_tail()}"
        self.start()
        self.wait_ready(timeout)

    def child(self, name: str) -> psutil.Process | None:
        """The live child titled ``portunus: <name>`` (``control``, ``web``, ``shard 0``)."""
        return self.titled().get(f"portunus: {name}")

    def cleanup(self) -> None:
        self.kill_tree()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # ---- talking to it

    def cli_env(self, token: Any = None, env: dict[str, str] | None = None) -> dict[str, str]:
        out = dict(self.env)
        out.pop("NOTIFY_SOCKET", None)
        if token is OPERATOR_TOKEN:
            token = self.token
        if token is not None:
            out["PORTUNUS_OPERATOR_TOKEN"] = token
        out.update(env or {})
        return out

    def cli(self, *args: str, token: Any = None, env: dict[str, str] | None = None,
            timeout: float = 30.0, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``portunus-server --data-dir D ARGS...``; never raises on a non-zero exit.

        ``token=None`` sets no ``PORTUNUS_OPERATOR_TOKEN`` (the CLI then reads
        D/operator.token, as an operator would); a string or ``OPERATOR_TOKEN`` sets it.
        """
        argv = [SERVER_BIN, "--data-dir", str(data_dir or self.data_dir), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=self.cli_env(token, env), cwd=self.workdir, stdin=subprocess.DEVNULL)

    def cli_json(self, *args: str, token: Any = None, expect_rc: int = 0) -> Any:
        """``cli(*args, "--format", "json")``, asserting the exit code; the parsed stdout."""
        res = self.cli(*args, "--format", "json", token=token)
        assert res.returncode == expect_rc, (
            f"{args} exited {res.returncode}, wanted {expect_rc}\nstdout: {res.stdout}\nstderr: {res.stderr}")
        return json.loads(res.stdout) if res.stdout.strip() else None

    def http(self, method: str, path: str, body: Any = None, *, token: Any = OPERATOR_TOKEN,
             raw: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> ApiResponse:
        """One request to the API; ``body`` is sent as JSON, ``raw`` as-is; ``token=None``
        sends no Authorization header."""
        hdrs = dict(headers or {})
        if token is OPERATOR_TOKEN:
            token = self.token
        if token is not None:
            hdrs.setdefault("Authorization", f"Bearer {token}")
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(LOOPBACK, self.api_port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return ApiResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def rpc(self, method: str, params: dict[str, Any] | None = None, *, token: Any = OPERATOR_TOKEN,
            timeout: float = 15.0) -> Any:
        """One control-socket request (``portunus.control.client.call_sync``);
        raises ``PortunusError`` on an error reply."""
        from portunus.control.client import call_sync

        if token is OPERATOR_TOKEN:
            token = self.token
        return call_sync(self.socket_path, token, method, params or {}, timeout)

    def rules(self) -> dict[int, dict[str, Any]]:
        """Rule id -> rule JSON, over the control socket."""
        return {r["id"]: r for r in self.rpc("rules.list")["rules"]}

    def scrape(self) -> Metrics:
        return scrape(self.metrics_url)


class ServerFactory:
    """Starts ServerProcs under ``workdir`` (data dir ``workdir/<name>``) and kills
    every process tree at ``close``, whatever the test's outcome."""

    def __init__(self, workdir: Path, ports: PortAllocator) -> None:
        self.workdir = workdir
        self.ports = ports
        self.procs: list[ServerProc] = []

    def __call__(self, *, shards: int = 1, settings: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, ready: bool = True, start: bool = True,
                 data_dir: Path | None = None) -> ServerProc:
        name = f"server{len(self.procs)}"
        proc = ServerProc(workdir=self.workdir, data_dir=data_dir or self.workdir / name, ports=self.ports,
                          settings=settings, shards=shards, env=env, name=name)
        self.procs.append(proc)
        if start:
            proc.start()
            if ready:
                proc.wait_ready()
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                sys.stdout.write(proc.stderr_tail() + "\n")  # shown by pytest on failure
            proc.cleanup()
        self.procs.clear()


class FakeNotify:
    """A fake systemd ``$NOTIFY_SOCKET``: a SOCK_DGRAM Unix socket collecting
    sd_notify datagrams as dicts (``{"READY": "1", "STATUS": ...}``), each with
    the monotonic time it was read at."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ptn-notify-", dir="/tmp")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self.received_at: list[float] = []

    def poll(self) -> list[dict[str, str]]:
        """Read every datagram queued so far; returns all messages seen."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            self.received_at.append(time.monotonic())

    def count(self, key: str, value: str = "1") -> int:
        return sum(1 for m in self.poll() if m.get(key) == value)

    def wait(self, key: str, value: str = "1", since: int = 0, timeout: float = 10.0) -> dict[str, str]:
        return wait_for(lambda: next((m for m in self.poll()[since:] if m.get(key) == value), None),
                        timeout, interval=0.002, what=f"{key}={value} on the notify socket (got {self.messages})")

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
