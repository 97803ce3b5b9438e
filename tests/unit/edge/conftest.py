"""Fixtures for the client side of the edge link: a throwaway server certificate, a
fake edge gateway on 127.0.0.1, and a fake supervisor on the other end of a socketpair."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from portunus.edge.bundle import Bundle
from portunus.ipc.framing import Channel
from portunus.ipc.messages import as_dict
from portunus.ipc.messages import from_dict as message

from .fake_server import FakeEdgeServer, make_cert


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    return make_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture(scope="session")
def other_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    return make_cert(tmp_path_factory.mktemp("cert2"), "other")


@pytest.fixture
async def fake(cert: tuple[Path, Path, str]) -> AsyncIterator[FakeEdgeServer]:
    server = FakeEdgeServer(*cert)
    await server.start()
    yield server
    await server.stop()


def bundle_for(
    server: FakeEdgeServer,
    client_id: str = "01HCLIENT",
    name: str = "edge-01",
    token: str | None = None,
    path: str | None = None,
) -> Bundle:
    """A bundle for a client the fake already knows (registered with a token)."""
    tok = token or f"token-{client_id}"
    if client_id not in server.clients:
        server.add_client(client_id, name, tok)
    return Bundle(
        server=f"127.0.0.1:{server.port}",
        fingerprint=server.fingerprint,
        client_id=client_id,
        client_name=name,
        token=tok,
        path=path,
    )


class FakeSupervisor:
    """The supervisor end of the link's channel: records frames, answers on request."""

    def __init__(self, sock: socket.socket) -> None:
        self.chan = Channel(sock)
        self.got: list[dict[str, Any]] = []

    def pump(self) -> None:
        try:
            self.got += [as_dict(m) for m, _ in self.chan.read()]
        except EOFError:
            pass

    async def next(self, kind: str, after: int = 0, timeout: float = 5.0) -> dict[str, Any]:
        """The first frame of ``kind`` at index >= after."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            self.pump()
            for m in self.got[after:]:
                if m.get("type") == kind:
                    return m
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {kind!r} from the link; got {self.got}")
            await asyncio.sleep(0.005)

    def answer(self, msg: dict[str, Any], state: str = "active") -> None:
        """Reply to a sync/apply the way the real supervisor does."""
        ids = [r["id"] for r in msg.get("rules", msg.get("upsert", []))]
        self.chan.send(
            message(
                {
                    "type": "applied",
                    "seq": msg["seq"],
                    "results": {i: {"state": state, "reason": None} for i in ids},
                }
            )
        )

    def send(self, msg: dict[str, Any]) -> None:
        self.chan.send(message(msg))


@pytest.fixture
def sup_pair() -> Iterator[tuple[socket.socket, FakeSupervisor]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sup = FakeSupervisor(b)
    yield a, sup
    for s in (a, b):
        s.close()
