"""run_control in a real child process: the gateway is wired in, a taken
control_listen does not stop the control plane, the clients gauge is published."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portunus.control.fleet.cert import ensure_server_cert
from portunus.control.fleet.gateway import EdgeGateway
from portunus.control.fleet.remote_link import RemoteLink
from portunus.control.main import start_gateway
from portunus.control.rpc.caller import ControlCaller
from portunus.exitcodes import ChildExit
from tests.integration.spawn import free_port, spawn_control
from tests.unit.control.fleet.fake_edge import FakeEdge, uri_parts

TOKEN = "edge-process-operator-token-abcdefghijklmnopqrstuvwxyz"


class Child:
    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.port = port
        self.metrics = base / "run" / "metrics"
        self.metrics.mkdir(parents=True)
        self.sock = str(base / "run" / "control.sock")
        self.proc, self.ours = spawn_control(
            base / "data", base / "run", TOKEN, f"127.0.0.1:{port}"
        )

    async def wait_ready(self) -> ControlCaller:
        client = ControlCaller(self.sock, TOKEN, timeout=5)
        for _ in range(500):
            if os.path.exists(self.sock):
                return client
            assert self.proc.poll() is None, (
                self.proc.stderr.read().decode() if self.proc.stderr else ""
            )
            await asyncio.sleep(0.02)
        raise AssertionError("control socket never appeared")

    def stop(self) -> list[dict[str, Any]]:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=10)
        self.ours.close()
        return [json.loads(x) for x in err.decode().splitlines() if x.startswith("{")]


@pytest.fixture
def children(short_dir: Path) -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()
        c.ours.close()


async def test_gateway_serves_in_the_control_process(
    short_dir: Path, children: list[Child]
) -> None:
    child = Child(short_dir, free_port())
    children.append(child)
    client = await child.wait_ready()
    enrollment = await client.call("clients.enroll", {"name": "edge-01"})
    host, port, code, fp = uri_parts(enrollment["uri"])
    assert (host, port) == ("127.0.0.1", child.port)  # the host of control_listen
    assert oct(os.stat(short_dir / "data" / "server.key").st_mode & 0o777) == "0o600"
    assert fp == ensure_server_cert(str(short_dir / "data")).fingerprint
    e = FakeEdge(port, fp)
    enrolled = await e.enroll(code)
    await e.close()
    live = FakeEdge(port, fp)
    live.auto = ("active", None)
    assert (await live.hello(enrolled["token"], enrolled["client_id"]))["type"] == "welcome"
    rule = await client.call(
        "rules.push",
        {
            "client": "edge-01",
            "listen_port": 19090,
            "targets": [{"host": "127.0.0.1", "port": 9090}],
        },
    )
    assert rule["state"] == "active"
    assert any(p.name.startswith("gauge_livemostrecent_") for p in child.metrics.iterdir())
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(child.metrics))
    assert registry.get_sample_value("portunus_clients_connected") == 1.0
    await live.close()
    logs = child.stop()
    events = [x["event"] for x in logs]
    assert "edge.gateway_ready" in events and "edge.connected" in events
    assert enrolled["token"] not in json.dumps(logs)


async def test_taken_control_listen_is_fatal_to_control(
    short_dir: Path, children: list[Child]
) -> None:
    """Run without a socket from the supervisor, control binds control_listen itself;
    a taken address is logged naming the key and control exits LISTEN_FAILED (73),
    which the supervisor's policy turns into a halt instead of a respawn loop."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        child = Child(short_dir, port)
        children.append(child)
        assert child.proc.wait(timeout=20) == ChildExit.LISTEN_FAILED
        logs = child.stop()
    failed = [x for x in logs if x["event"] == "edge.gateway_bind_failed"]
    assert failed and failed[0]["level"] == "error"
    assert failed[0]["control_listen"] == f"127.0.0.1:{port}"
    assert "control_listen" in failed[0]["hint"]
    assert not any(x["event"] == "control.ready" for x in logs)


async def test_start_gateway_reports_a_bind_failure(tmp_path: Path, capfd: Any) -> None:
    cert = ensure_server_cert(str(tmp_path))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        gw = EdgeGateway(None, RemoteLink(), cert.ssl_context(), "127.0.0.1", port)  # type: ignore[arg-type]
        assert await start_gateway(gw, f"127.0.0.1:{port}") is False
    assert f"127.0.0.1:{port}" in capfd.readouterr().err
    await gw.close()
