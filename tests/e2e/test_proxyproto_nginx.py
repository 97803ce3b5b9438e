"""Our PROXY headers as read by a real receiver: nginx's stream module.

nginx listens with ``proxy_protocol``, proxies to a tiny echo origin and logs what it
decoded.  The header's addresses need not be the connection's: the socket itself is
127.0.0.1, the header may claim any IPv4 or IPv6 pair.  The echo proves nginx consumed
exactly our header (a wrong v2 length would eat or leak payload bytes).
"""

from __future__ import annotations

import errno
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from portunus.shard.proxyproto import build_header
from tests.e2e.features.nginx_origin import NGINX_STREAM_MODULE, require_nginx

LOG_FORMAT = (
    "$remote_port|$proxy_protocol_addr|$proxy_protocol_port"
    "|$proxy_protocol_server_addr|$proxy_protocol_server_port"
)


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while chunk := self.request.recv(65536):
            self.request.sendall(chunk)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class Nginx:
    port: int
    access_log: Path
    error_log: Path

    def log_line_for(self, client_port: int, timeout: float = 10.0) -> list[str]:
        """The access-log fields of the session whose real client port was ``client_port``."""
        found: list[list[str]] = []

        def logged() -> bool:
            if self.access_log.exists():
                for line in self.access_log.read_text().splitlines():
                    fields = line.split("|")
                    if fields[0] == str(client_port):
                        found.append(fields[1:])
                        return True
            return False

        _wait_for(logged, timeout, f"nginx access log line for client port {client_port}")
        return found[0]


@pytest.fixture(scope="module")
def echo_origin() -> Iterator[int]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, name="echo-origin", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, echo_origin: int) -> Iterator[Nginx]:
    binary = require_nginx()
    tmp = tmp_path_factory.mktemp("nginx-pp")
    port = _free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""load_module {NGINX_STREAM_MODULE};
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
daemon off;
events {{ worker_connections 64; }}
stream {{
    log_format pp '{LOG_FORMAT}';
    access_log {tmp}/access.log pp;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        proxy_protocol_timeout 5s;
        proxy_half_close on;
        proxy_pass 127.0.0.1:{echo_origin};
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [binary, "-p", f"{tmp}/", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    pid_file = tmp / "nginx.pid"
    try:
        # nginx binds its listeners before it writes the pid file.
        _wait_for(lambda: pid_file.exists() or proc.poll() is not None, 10, "nginx to start")
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"nginx exited with {proc.returncode}: {err}")
        yield Nginx(port=port, access_log=tmp / "access.log", error_log=tmp / "error.log")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


def _send_through(nginx: Nginx, header: bytes, payload: bytes) -> tuple[int, bytes]:
    """One session: header + payload in, echo out; returns (our real port, echoed bytes)."""
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=10) as sock:
        client_port = int(sock.getsockname()[1])
        received = bytearray()
        try:
            sock.sendall(header + payload)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # nginx resets sessions whose header it rejects
        except OSError as exc:
            # A reset that lands before our half-close makes shutdown() fail with ENOTCONN.
            if exc.errno != errno.ENOTCONN:
                raise
    return client_port, bytes(received)


# (src, dst, what nginx must report for src and dst)
CASES = [
    pytest.param(
        ("192.0.2.10", 40001), ("198.51.100.20", 443), ("192.0.2.10", "198.51.100.20"), id="ipv4"
    ),
    pytest.param(
        ("2001:db8::10", 40002),
        ("2001:db8:1::20", 8443),
        ("2001:db8::10", "2001:db8:1::20"),
        id="ipv6",
    ),
    pytest.param(
        ("::ffff:203.0.113.5", 40003),
        ("::ffff:198.51.100.7", 80),
        ("203.0.113.5", "198.51.100.7"),
        id="mapped-pair-as-ipv4",
    ),
    pytest.param(
        ("203.0.113.9", 40004),
        ("2001:db8::5", 443),
        ("::ffff:203.0.113.9", "2001:db8::5"),
        id="mixed-promoted-to-ipv6",
    ),
]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(("src", "dst", "reported"), CASES)
def test_nginx_decodes_our_header(
    nginx: Nginx,
    version: str,
    src: tuple[str, int],
    dst: tuple[str, int],
    reported: tuple[str, str],
) -> None:
    header = build_header(version, src, dst)
    payload = f"hello over {version} from {src[0]}\n".encode() * 50
    client_port, echoed = _send_through(nginx, header, payload)
    assert echoed == payload, f"nginx did not consume exactly the header; see {nginx.error_log}"

    addr, port, server_addr, server_port = nginx.log_line_for(client_port)
    assert (addr, int(port)) == (reported[0], src[1])
    assert (server_addr, int(server_port)) == (reported[1], dst[1])


def test_nginx_rejects_a_corrupted_header(nginx: Nginx) -> None:
    """Control: the receiver really validates, so the positive cases mean something."""
    header = bytearray(build_header("v2", ("192.0.2.10", 1), ("192.0.2.11", 2)))
    header[12] = 0x11  # version 1 nibble: not a valid v2 header
    client_port, echoed = _send_through(nginx, bytes(header), b"payload")
    assert echoed == b""
    addr, port, _, _ = nginx.log_line_for(client_port)
    assert (addr, port) in {("", ""), ("-", "-")}
