"""nginx (stream module) as a PROXY-protocol-reading origin.

Each ``listen 127.0.0.1:P proxy_protocol`` server proxies to a plain upstream and
logs what it decoded from the header, one line per session:
``server_port|proxy_protocol_addr|proxy_protocol_port|proxy_protocol_server_addr|
proxy_protocol_server_port|bytes_received``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.support import LOOPBACK, wait_for

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
LOG_FORMAT = (
    "$server_port|$proxy_protocol_addr|$proxy_protocol_port"
    "|$proxy_protocol_server_addr|$proxy_protocol_server_port|$bytes_received"
)


INSTALL_HINT = "apt-get install nginx libnginx-mod-stream, or bench/peers/install"


def _nginx_path() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )


def require_nginx() -> str:
    """The nginx binary, or skip the calling test with what is missing.

    nginx is an optional peer (README: the e2e tests use it "when present"), so a
    machine without it skips these tests rather than failing them.
    """
    found = _nginx_path()
    if found is None:
        pytest.skip(f"nginx is not installed ({INSTALL_HINT})")
    if not NGINX_STREAM_MODULE.exists():
        pytest.skip(f"nginx stream module missing at {NGINX_STREAM_MODULE} ({INSTALL_HINT})")
    return found


@dataclass
class Session:
    server_port: int
    addr: str
    port: str
    server_addr: str
    server_port_claimed: str
    bytes_received: int


class NginxProxyOrigin:
    """nginx with one PROXY-protocol listener per upstream; ``ports[i]`` proxies to
    ``upstreams[i]``."""

    def __init__(self, workdir: Path, listen_ports: list[int], upstreams: list[int]) -> None:
        binary = require_nginx()
        self.dir = workdir
        self.ports = listen_ports
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "error.log"
        servers = "".join(
            f"""    server {{
        listen {LOOPBACK}:{p} proxy_protocol;
        proxy_protocol_timeout 5s;
        proxy_half_close on;
        proxy_pass {LOOPBACK}:{u};
    }}
"""
            for p, u in zip(listen_ports, upstreams, strict=True)
        )
        conf = workdir / "nginx.conf"
        conf.write_text(f"""load_module {NGINX_STREAM_MODULE};
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {self.error_log} info;
daemon off;
events {{ worker_connections 256; }}
stream {{
    log_format pp '{LOG_FORMAT}';
    access_log {self.access_log} pp;
{servers}}}
""")
        self.proc = subprocess.Popen(
            [binary, "-p", f"{workdir}/", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        pid_file = workdir / "nginx.pid"
        wait_for(
            lambda: pid_file.exists() or self.proc.poll() is not None, 10, what="nginx to start"
        )
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise AssertionError(f"nginx exited with {self.proc.returncode}: {err}")

    def sessions(self) -> list[Session]:
        out: list[Session] = []
        if not self.access_log.exists():
            return out
        for line in self.access_log.read_text().splitlines():
            f = line.split("|")
            out.append(Session(int(f[0]), f[1], f[2], f[3], f[4], int(f[5])))
        return out

    def session_for(self, client_port: int, timeout: float = 10.0) -> Session:
        """The logged session whose PROXY header claimed source port ``client_port``."""

        def find() -> Session | None:
            return next((s for s in self.sessions() if s.port == str(client_port)), None)

        found = wait_for(
            find,
            timeout,
            what=lambda: (
                f"nginx log line for client port {client_port}:"
                f" {self.access_log.read_text() if self.access_log.exists() else ''}"
            ),
        )
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
