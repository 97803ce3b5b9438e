"""Helpers for the forwarding-feature tests (ranges, DNS, failover, PROXY, SNI, UDP).

- ``ServerProc`` / ``ServerFactory``: ``portunus-server serve`` on loopback ports
  with a private data dir, driven like an operator would: the CLI (``cli``), the
  HTTP API (``http``) and the control socket (``rpc``).
- ``port_reporter``: an origin handler that first writes the port it was reached
  on, so one look at the reply tells which same-offset target a range port used.
- ``UdpPortEcho``: a UDP echo on several ports that prefixes each reply with the
  port it arrived on.
- ``bindable``: can this process bind a port right now (proof that nothing kept it)?
- ``StreamListener``: a tiny threaded TCP listener on any loopback address/family.

Everything binds loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.support import (
    LOOPBACK,
    VENV_BIN,
    ConnRecord,
    ManagedProc,
    Metrics,
    PortAllocator,
    recv_exact,
    scrape,
    wait_for,
)

SERVER_BIN = os.environ.get("PORTUNUS_E2E_SERVER") or str(VENV_BIN / "portunus-server")


# ------------------------------------------------------------------ origins


def port_reporter(conn: socket.socket, rec: ConnRecord) -> None:
    """Write ``<local port>\\n`` first, then echo; half-close passes on."""
    hello = f"{conn.getsockname()[1]}\n".encode()
    conn.sendall(hello)
    rec.tx.update(hello)
    while True:
        data = conn.recv(65536)
        if not data:
            break
        rec.rx.update(data)
        conn.sendall(data)
        rec.tx.update(data)
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)


def read_line(sock: socket.socket, limit: int = 256) -> bytes:
    """Bytes up to and including the first newline (or EOFError)."""
    out = bytearray()
    while not out.endswith(b"\n"):
        if len(out) >= limit:
            raise ValueError(f"no newline in the first {limit} bytes: {bytes(out)!r}")
        out += recv_exact(sock, 1)
    return bytes(out)


def reached_port(port: int, payload: bytes = b"", timeout: float = 5.0,
                 host: str = LOOPBACK) -> int:
    """Connect to ``host:port`` (through Portunus), read the origin's port line,
    check ``payload`` echoes, close; returns the origin port that answered."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        origin_port = int(read_line(s))
        if payload:
            s.sendall(payload)
            assert recv_exact(s, len(payload)) == payload
    return origin_port


class UdpPortEcho:
    """UDP echo on every port in ``ports``; replies are ``b"<port>:" + data``."""

    def __init__(self, ports: list[int], host: str = LOOPBACK) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.received: dict[int, int] = dict.fromkeys(ports, 0)  # port -> payload bytes
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for p in ports:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((host, p))
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, p)
            self.socks.append(s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="udp-port-echo")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.sel.select(0.1):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                with contextlib.suppress(BlockingIOError, OSError):
                    data, addr = s.recvfrom(65536)
                    self.received[key.data] += len(data)
                    s.sendto(f"{key.data}:".encode() + data, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks:
            s.close()
        self.sel.close()


def udp_exchange(port: int, payload: bytes, timeout: float = 2.0, tries: int = 5) -> bytes:
    """Send one datagram to ``port`` and return the reply (resends on loss)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout / tries)
        s.connect((LOOPBACK, port))
        for _ in range(tries):
            s.send(payload)
            try:
                return s.recv(65536)
            except TimeoutError:
                continue
    raise AssertionError(f"no UDP reply from port {port} within {timeout}s")


def bindable(port: int, proto: str = "tcp", host: str = LOOPBACK) -> bool:
    """True if a plain socket (no SO_REUSEADDR/SO_REUSEPORT) can bind ``port`` now:
    then no socket of anyone's is bound there (a leftover reuseport listener of
    Portunus would make this bind fail)."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        if proto == "tcp":
            s.listen(1)
    return True


class StreamListener:
    """A threaded TCP listener on ``(host, port)`` of any loopback family, running
    ``handler(conn)`` per connection; for origins the shared ``Origin`` (IPv4
    only) does not cover."""

    def __init__(self, host: str, port: int, handler: Any) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.lsock = socket.socket(family, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, port))
        self.lsock.listen(128)
        self.lsock.settimeout(0.1)
        self.port: int = self.lsock.getsockname()[1]
        self.handler = handler
        self.accepted = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"listener-{port}")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(10)
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, EOFError, ValueError), conn:
            self.handler(conn)

    def close(self) -> None:
        self._stop.set()
        self.lsock.close()
        self._thread.join(5)
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


# ------------------------------------------------------------------ server


class CliResult:
    """One ``portunus-server`` invocation: exit code, stdout, stderr, parsed JSON."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out!r}, err={self.err!r})"


class ServerProc(ManagedProc):
    """``portunus-server --data-dir D serve --shards N`` on free loopback ports."""

    def __init__(self, *, workdir: Path, ports: PortAllocator, shards: int = 1,
                 settings: dict[str, Any] | None = None, name: str = "server") -> None:
        from tests.e2e.support import toml_value

        self.data_dir = workdir / f"{name}-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.metrics_port, self.control_port = ports.ports(3)
        conf: dict[str, Any] = {
            "operator_http_listen": f"{LOOPBACK}:{self.http_port}",
            "metrics_listen": f"{LOOPBACK}:{self.metrics_port}",
            "control_listen": f"{LOOPBACK}:{self.control_port}",
            "listen_address": LOOPBACK,
            "log_format": "json",
            "shutdown_drain_timeout_secs": 2,
        }
        conf.update(settings or {})
        (self.data_dir / "server.toml").write_text(
            "".join(f"{k} = {toml_value(v)}\n" for k, v in conf.items()))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PORTUNUS_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.base_env = dict(env)
        argv = [SERVER_BIN, "--data-dir", str(self.data_dir), "serve", "--shards", str(shards)]
        super().__init__(argv, workdir=workdir, env=env, name=name)

    @property
    def socket_path(self) -> str:
        return str(self.data_dir / "run" / "control.sock")

    @property
    def metrics_dir(self) -> Path:
        return self.data_dir / "run" / "metrics"

    @property
    def token(self) -> str:
        return (self.data_dir / "operator.token").read_text().strip()

    def wait_ready(self, timeout: float = 20.0) -> None:
        self.wait_log("supervisor.ready", timeout=timeout)
        wait_for(lambda: self.http("GET", "/v1/health")[0] == 200, timeout,
                 what=lambda: "GET /v1/health to answer 200\n" + self.stderr_tail())

    # ---- operator interfaces

    def cli(self, *args: str, timeout: float = 30.0) -> CliResult:
        """Run ``portunus-server --data-dir D ARGS...`` with the operator token."""
        env = dict(self.base_env, PORTUNUS_OPERATOR_TOKEN=self.token)
        proc = subprocess.run([SERVER_BIN, "--data-dir", str(self.data_dir), *args],
                              env=env, capture_output=True, text=True, timeout=timeout, check=False)
        return CliResult(proc)

    def cli_json(self, *args: str) -> Any:
        """``cli(..., --format json)`` that must exit 0; returns the JSON."""
        res = self.cli(*args, "--format", "json")
        assert res.code == 0, res
        return res.json

    def http(self, method: str, path: str, body: Any = None,
             timeout: float = 15.0) -> tuple[int, Any]:
        """One /v1 request with the bearer token; returns (status, JSON or None)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{LOOPBACK}:{self.http_port}{path}", data=data,
                                     method=method)
        with contextlib.suppress(FileNotFoundError):
            req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
        return status, (json.loads(raw) if raw else None)

    def rpc(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        from portunus.control.client import call_sync

        return call_sync(self.socket_path, self.token, method, params, timeout)

    def scrape(self) -> Metrics:
        return scrape(f"http://{LOOPBACK}:{self.metrics_port}/metrics")

    def remove_rule(self, rule_id: int) -> None:
        """Remove a rule and wait until its row is gone (ports released)."""
        self.rpc("rules.remove", {"id": rule_id})

        def gone() -> bool:
            return all(r["id"] != rule_id for r in self.rpc("rules.list", {})["rules"])

        wait_for(gone, 10, what=f"rule {rule_id} to be deleted")


class ServerFactory:
    """Starts ServerProcs and SIGKILLs every one of them at ``close``."""

    def __init__(self, workdir: Path, ports: PortAllocator) -> None:
        self.workdir = workdir
        self.ports = ports
        self.procs: list[ServerProc] = []

    def __call__(self, *, shards: int = 1, settings: dict[str, Any] | None = None,
                 wrap: Callable[[list[str]], list[str]] | None = None) -> ServerProc:
        """``wrap`` rewrites the argv (e.g. to run the server in a mount namespace)."""
        proc = ServerProc(workdir=self.workdir, ports=self.ports, shards=shards, settings=settings,
                          name=f"server{len(self.procs)}")
        if wrap is not None:
            proc.argv = wrap(proc.argv)
        self.procs.append(proc)
        proc.start()
        proc.wait_ready()
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                print(proc.stderr_tail())  # shown by pytest on failure
            proc.kill_tree()
        self.procs.clear()
