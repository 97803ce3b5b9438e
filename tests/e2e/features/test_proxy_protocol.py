"""PROXY protocol v1/v2 written by Portunus and read by a real receiver: nginx as
the ORIGIN (``listen ... proxy_protocol``), proxying on to an echo.

What nginx logs must be the real client: 127.0.0.1 (or ::1) and the client's own
source port, with Portunus's listen address/port as the destination.  The echo
coming back byte-exact proves nginx consumed exactly our header.  A rule without
PROXY protocol to the same nginx is the control: nginx must refuse it.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.features.helpers import ServerFactory
from tests.e2e.features.nginx_origin import NginxProxyOrigin, require_nginx
from tests.e2e.support import (
    LOOPBACK,
    STANDALONE_BIN,
    Origin,
    PortAllocator,
    StandaloneFactory,
    echo,
    standalone_toml,
)

PAYLOAD = b"payload after the PROXY header\n" * 200


@dataclass
class Nginx:
    origin: NginxProxyOrigin
    port: int  # the PROXY-protocol listener


@pytest.fixture(scope="module")
def nginx(
    tmp_path_factory: pytest.TempPathFactory,
    ports: PortAllocator,
    origin_module: Callable[..., Origin],
) -> Iterator[Nginx]:
    require_nginx()
    upstream = origin_module(echo)
    port = ports.port()
    n = NginxProxyOrigin(tmp_path_factory.mktemp("nginx"), [port], [upstream.port])
    yield Nginx(n, port)
    n.close()


def check_session(nginx: Nginx, listen: int, host: str = LOOPBACK) -> None:
    client_port, back = send_and_echo(listen, host)
    assert back == PAYLOAD, (
        f"echo differs ({len(back)} of {len(PAYLOAD)} bytes); see {nginx.origin.error_log}"
    )
    s = nginx.origin.session_for(client_port)
    assert (s.addr, s.port) == (host, str(client_port))
    assert (s.server_addr, s.server_port_claimed) == (host, str(listen))
    assert s.server_port == nginx.port
    assert s.bytes_received >= len(PAYLOAD)


def send_and_echo(listen: int, host: str = LOOPBACK) -> tuple[int, bytes]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect((host, listen))
        client_port = s.getsockname()[1]
        s.sendall(PAYLOAD)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return client_port, bytes(out)


def test_standalone_v1_per_target_and_v2_per_rule(
    standalone: StandaloneFactory, ports: PortAllocator, nginx: Nginx
) -> None:
    v1, v2, plain = ports.ports(3)
    standalone(
        [
            {
                "name": "pp-v1",
                "listen_port": v1,
                "targets": [{"host": LOOPBACK, "port": nginx.port, "proxy_protocol": "v1"}],
            },
            {
                "name": "pp-v2",
                "listen_port": v2,
                "proxy_protocol": "v2",
                "target": f"{LOOPBACK}:{nginx.port}",
            },
            {"name": "no-pp", "listen_port": plain, "target": f"{LOOPBACK}:{nginx.port}"},
        ]
    )
    check_session(nginx, v1)
    check_session(nginx, v2)
    _port, back = send_and_echo(plain)
    assert back == b"", "nginx accepted a session without a PROXY header: the control is void"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_standalone_ipv6_client(
    standalone: StandaloneFactory, ports: PortAllocator, nginx: Nginx, version: str
) -> None:
    """Portunus listening on ::1: the header is TCP6 / AF_INET6 with ::1 on both ends,
    though the hop to nginx is IPv4."""
    listen = ports.port()
    proc = standalone(
        [
            {
                "name": f"pp6-{version}",
                "listen_port": listen,
                "proxy_protocol": version,
                "target": f"{LOOPBACK}:{nginx.port}",
            }
        ],
        settings={"listen_address": "::1"},
        ready=False,
    )
    proc.wait_log("rule.activated", rule=f"pp6-{version}")
    check_session(nginx, listen, host="::1")


def test_standalone_range_rule_header_names_each_listen_port(
    standalone: StandaloneFactory,
    ports: PortAllocator,
    tmp_path: Path,
    origin: Callable[..., Origin],
) -> None:
    """On a range, the header's destination is the port the client actually used."""
    require_nginx()
    upstream = origin(echo)
    first_pp, listen = ports.block(3), ports.block(3)
    n = NginxProxyOrigin(tmp_path, [first_pp + i for i in range(3)], [upstream.port] * 3)
    try:
        standalone(
            [
                {
                    "name": "pp-range",
                    "listen_ports": f"{listen}-{listen + 2}",
                    "proxy_protocol": "v2",
                    "target": f"{LOOPBACK}:{first_pp}-{first_pp + 2}",
                }
            ]
        )
        for i in (2, 0, 1):
            client_port, back = send_and_echo(listen + i)
            assert back == PAYLOAD
            s = n.session_for(client_port)
            assert (s.server_port, s.server_port_claimed) == (first_pp + i, str(listen + i))
    finally:
        n.close()


def test_server_flag_and_body_field(
    server: ServerFactory, ports: PortAllocator, nginx: Nginx
) -> None:
    srv = server()
    v2, v1, per_target = ports.ports(3)
    rule = srv.cli_json(
        "push-rule", "local", str(v2), f"{LOOPBACK}:{nginx.port}", "--proxy-protocol", "v2"
    )
    assert rule["proxy_protocol"] == "v2"
    status, body = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": "local",
            "listen_port": v1,
            "proxy_protocol": "v1",
            "targets": [{"host": LOOPBACK, "port": nginx.port}],
        },
    )
    assert status == 201 and body["proxy_protocol"] == "v1", body
    status, body = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": "local",
            "listen_port": per_target,
            "targets": [{"host": LOOPBACK, "port": nginx.port, "proxy_protocol": "v2"}],
        },
    )
    assert status == 201, body
    for listen in (v2, v1, per_target):
        check_session(nginx, listen)
    bad = srv.cli(
        "push-rule",
        "local",
        str(ports.port()),
        f"{LOOPBACK}:{nginx.port}",
        "--proxy-protocol",
        "v3",
    )
    assert bad.code == 2, bad


def _udp_first_datagram(listen: int, origin: socket.socket) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(b"hello", (LOOPBACK, listen))
        return origin.recvfrom(65536)[0]


def _pp_signature(data: bytes) -> bool:
    return data.startswith(b"PROXY ") or data.startswith(b"\r\n\r\n\x00\r\nQUIT\n")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_server_udp_rule_with_proxy_protocol_is_refused_or_honoured(
    server: ServerFactory, ports: PortAllocator, version: str
) -> None:
    srv = server()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as origin:
        origin.bind((LOOPBACK, 0))
        origin.settimeout(5)
        listen = ports.port()
        res = srv.cli(
            "push-rule",
            "local",
            str(listen),
            f"{LOOPBACK}:{origin.getsockname()[1]}",
            "--protocol",
            "udp",
            "--proxy-protocol",
            version,
        )
        if res.code == 2:
            assert "validation.proxy_protocol" in res.err and "TCP-only" in res.err, res
            status, body = srv.http(
                "POST",
                "/v1/rules",
                {
                    "client": "local",
                    "listen_port": listen,
                    "protocol": "udp",
                    "targets": [
                        {
                            "host": LOOPBACK,
                            "port": origin.getsockname()[1],
                            "proxy_protocol": version,
                        }
                    ],
                },
            )
            assert (status, body["error"]["code"]) == (400, "validation.proxy_protocol"), body
            return
        assert res.code == 0, res
        assert _pp_signature(_udp_first_datagram(listen, origin)), "bare datagram, no PROXY header"


def test_standalone_udp_rule_with_proxy_protocol_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "udp-pp.toml"
    path.write_text(
        standalone_toml(
            {},
            [
                {
                    "name": "u",
                    "protocol": "udp",
                    "listen_port": 21000,
                    "proxy_protocol": "v1",
                    "target": "127.0.0.1:40000",
                }
            ],
        )
    )
    res = subprocess.run(
        [STANDALONE_BIN, "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2, res
    line = next(
        i
        for i, text in enumerate(path.read_text().splitlines(), 1)
        if text.startswith("proxy_protocol")
    )
    assert f"{path}:{line}: validation.proxy_protocol" in res.stderr, res.stderr
    assert "TCP-only" in res.stderr, res.stderr
