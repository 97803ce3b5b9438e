"""A fake control process for CLI tests: a Unix socket speaking the newline JSON
of docs/rpc.md, recording every request and answering with canned replies."""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from portunus.cli import common
from portunus.cli.server import cli
from portunus.errors import PortunusError

Reply = Any  # a result dict, a PortunusError, or a callable(params) -> either

TOKEN = "test-operator-token"


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        for line in self.rfile:
            req = json.loads(line)
            fake = self.server.fake
            with fake.lock:
                fake.requests.append(req)
                reply = fake.replies.get(req["method"])
            if callable(reply):
                reply = reply(req.get("params", {}))
            if reply is None:
                reply = PortunusError(
                    "internal", f"fake control: no canned reply for {req['method']}"
                )
            if isinstance(reply, PortunusError):
                body = {"id": req["id"], "error": reply.to_dict()}
            else:
                body = {"id": req["id"], "result": reply}
            self.wfile.write(json.dumps(body).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    fake: FakeControl


class FakeControl:
    """Canned replies per method; ``requests`` holds every request received."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, "run", "control.sock")
        self.requests: list[dict[str, Any]] = []
        self.replies: dict[str, Reply] = {}
        self.lock = threading.Lock()

    def reply(self, method: str, value: Reply) -> None:
        self.replies[method] = value

    @property
    def last(self) -> dict[str, Any]:
        assert self.requests, "the CLI sent no request"
        return self.requests[-1]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No operator's real environment or /etc/portunus token leaks into a test."""
    for var in (
        "PORTUNUS_OPERATOR_TOKEN",
        "PORTUNUS_TOKEN_FILE",
        "PORTUNUS_SOCKET",
        "PORTUNUS_DATA_DIR",
        "PORTUNUS_CONFIG",
        "PORTUNUS_RUNTIME_DIR",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(common, "SYSTEM_TOKEN_FILE", str(tmp_path / "etc-portunus-operator.token"))


@pytest.fixture
def control() -> Iterator[FakeControl]:
    # A short /tmp path: AF_UNIX paths are limited to 108 bytes, pytest's tmp_path is long.
    data_dir = tempfile.mkdtemp(prefix="pcli-", dir="/tmp")
    fake = FakeControl(data_dir)
    os.makedirs(os.path.dirname(fake.path))
    server = _Server(fake.path, _Handler)
    server.fake = fake
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def run(control: FakeControl) -> Callable[..., Result]:
    """Invoke ``portunus-server --data-dir <fake's dir> ARGS`` with a token in the env
    (pass ``env={"PORTUNUS_OPERATOR_TOKEN": None}`` to drop it)."""

    def _run(
        *args: str, env: dict[str, str | None] | None = None, data_dir: str | None = None
    ) -> Result:
        full_env: dict[str, str | None] = {"PORTUNUS_OPERATOR_TOKEN": TOKEN}
        full_env.update(env or {})
        return CliRunner().invoke(
            cli,
            ["--data-dir", data_dir or control.data_dir, *args],
            env=full_env,
            prog_name="portunus-server",
        )

    return _run
