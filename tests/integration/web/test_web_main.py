"""run_web in a real process on free loopback ports, with a fake control socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.spawn import free_port
from tests.unit.web.fakes import AUTH, RULE, STATS, TOKEN, FakeControl

SCRIPT = """
import sys
from portunus.config import Settings
from portunus.web.main import run_web
run_web(Settings(data_dir=sys.argv[1], runtime_dir=sys.argv[1],
                 operator_http_listen=sys.argv[2], metrics_listen=sys.argv[3]))
"""


class WebProcess:
    def __init__(self, runtime_dir: str, api: str, metrics: str) -> None:
        self.log_path = os.path.join(runtime_dir, "web.log")
        self.api = api
        self.metrics = metrics
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SCRIPT, runtime_dir, api, metrics],
                stdout=log,
                stderr=log,
                env={**os.environ, "PORTUNUS_LOG_FORMAT": "json"},
            )

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "web process did not exit"
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def fake(short_dir: Path) -> AsyncIterator[FakeControl]:
    """A fake control socket the web process talks to."""
    ctl = FakeControl(f"{short_dir}/control.sock")
    await ctl.start()
    yield ctl
    await ctl.stop()


@pytest.fixture
def spawn(short_dir: Path) -> Iterator[list[WebProcess]]:
    started: list[WebProcess] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
async def web(
    fake: FakeControl, short_dir: Path, spawn: list[WebProcess]
) -> AsyncIterator[WebProcess]:
    os.makedirs(os.path.join(short_dir, "metrics"), exist_ok=True)
    proc = WebProcess(str(short_dir), f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    spawn.append(proc)
    async with httpx.AsyncClient(base_url=f"http://{proc.api}") as client:
        deadline = time.monotonic() + 20
        while True:
            assert proc.proc.poll() is None, proc.log()
            try:
                await client.get("/v1/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, proc.log()
                await asyncio.sleep(0.05)
    yield proc


async def test_health_and_api_over_real_http_then_sigterm_exits_0(
    web: WebProcess, fake: FakeControl
) -> None:
    async with httpx.AsyncClient(base_url=f"http://{web.api}") as client:
        r = await client.get("/v1/health")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        fake.replies["rules.list"] = {"rules": [RULE]}
        r = await client.get("/v1/rules", headers=AUTH)
        assert (r.status_code, r.json()) == (200, {"rules": [RULE]})
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://{web.metrics}/metrics")
        assert r.status_code == 200
    web.proc.send_signal(signal.SIGHUP)  # a forwarded reload must not kill the web process
    async with httpx.AsyncClient(base_url=f"http://{web.api}") as client:
        deadline = time.monotonic() + 5
        while "web.sighup_ignored" not in web.log():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (await client.get("/v1/health")).status_code == 200
    web.proc.send_signal(signal.SIGTERM)
    assert await web.wait_exit(10) == 0
    log = web.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(e["event"] == "web.listening" for e in lines)
    assert all(line.startswith("{") for line in log.splitlines()), log  # JSON lines only
    # Two uvicorn servers (API, metrics) in one process: their lifecycle lines once each.
    said = [e["message"] for e in lines if e["event"] == "web.server"]
    pid = web.proc.pid
    for message in (
        f"Started server process [{pid}]",
        "Shutting down",
        f"Finished server process [{pid}]",
    ):
        assert said.count(message) == 1, said
    assert TOKEN not in log


async def test_sigterm_ends_an_open_stats_stream(web: WebProcess, fake: FakeControl) -> None:
    fake.replies["rules.stats"] = STATS
    async with httpx.AsyncClient(base_url=f"http://{web.api}", timeout=10) as client:
        async with client.stream("GET", "/v1/rules/7/stats/stream?interval=0.2", headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            assert (await anext(lines)).startswith("data: {")
            web.proc.send_signal(signal.SIGTERM)
            rest = [line async for line in lines]
    assert "event: end" in rest
    assert 'data: {"reason":"shutdown"}' in rest
    assert await web.wait_exit(10) == 0


async def test_taken_port_exits_with_boot_error_naming_the_key(
    short_dir: Path, spawn: list[WebProcess]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = WebProcess(str(short_dir), f"127.0.0.1:{free_port()}", addr)
        spawn.append(proc)
        assert await proc.wait_exit(20) == 73  # ChildExit.LISTEN_FAILED
    log = proc.log()
    assert "metrics_listen" in log
    assert addr in log
