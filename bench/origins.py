"""The origins every contender forwards to: iperf3, an nginx HTTP server, sockperf, echo.

Each ``start_*`` returns (Service, port) and raises StartError when the tool is missing
or does not come up; the caller appends the Service to its services() scope.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import (
    LOOPBACK,
    Service,
    free_port,
    is_listening,
    start_service,
    tool,
)

BODY_SIZE = 1024


def start_iperf3(log_dir: Path) -> tuple[Service, int]:
    """iperf3 server; it serves one test at a time, which is how rounds use it."""
    port = free_port()
    argv = [tool("iperf3"), "-s", "-B", LOOPBACK, "-p", str(port)]
    svc = start_service(f"iperf3-{port}", argv, log_dir, ready=lambda: is_listening(port))
    return svc, port


def nginx_http_conf(port: int, workdir: Path, workers: int) -> str:
    """A minimal HTTP origin: one location answering a 1 KiB body from memory."""
    body = "x" * BODY_SIZE
    temp = "\n".join(f"  {kind}_temp_path {workdir}/{kind};" for kind in ("client_body", "proxy"))
    return f"""worker_processes {workers};
pid {workdir}/origin.pid;
error_log {workdir}/origin-error.log;
daemon off;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temp}
  server {{
    listen {LOOPBACK}:{port} backlog=4096;
    location / {{ default_type text/plain; return 200 "{body}"; }}
  }}
}}
"""


def start_nginx_http(log_dir: Path, workers: int = 1) -> tuple[Service, int]:
    """nginx serving 1 KiB over HTTP; one worker keeps two cores for load and proxy."""
    port = free_port()
    workdir = log_dir / f"origin-http-{port}"
    workdir.mkdir()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_http_conf(port, workdir, workers))
    argv = [tool("nginx"), "-c", str(conf), "-p", str(workdir)]
    svc = start_service(f"origin-http-{port}", argv, log_dir, ready=lambda: is_listening(port))
    return svc, port


def start_sockperf(log_dir: Path, udp: bool, port: int | None = None) -> tuple[Service, int]:
    """sockperf server: answers ping-pong requests and counts throughput datagrams."""
    port = port or free_port()
    argv = [tool("sockperf"), "server", "-i", LOOPBACK, "-p", str(port)]
    if not udp:
        argv.insert(2, "--tcp")
    name = f"sockperf-{'udp' if udp else 'tcp'}-{port}"
    svc = start_service(name, argv, log_dir, ready=lambda: is_listening(port, udp))
    return svc, port


def start_echo(log_dir: Path) -> tuple[Service, int]:
    """The Python/uvloop echo origin that can hold 10k idle connections."""
    port = free_port()
    script = Path(__file__).with_name("echo_origin.py")
    argv = [sys.executable, str(script), str(port)]
    svc = start_service(f"echo-{port}", argv, log_dir, ready=lambda: is_listening(port))
    return svc, port
