"""The edge gateway wired like ``control.main`` (real TLS on 127.0.0.1, a free port)
with a fake local data plane, and a fake edge client speaking docs/edge.md."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from portunus.config import Settings
from portunus.control.auth import Authenticator, install_operator_token
from portunus.control.dataplane import DataPlanes
from portunus.control.fleet.cert import ServerCert, ensure_server_cert
from portunus.control.fleet.clients import ClientService
from portunus.control.fleet.gateway import EdgeGateway
from portunus.control.fleet.remote_link import RemoteLink
from portunus.control.rpc.caller import ControlCaller
from portunus.control.rpc.handlers import ControlContext, Dispatcher
from portunus.control.rpc.server import RpcServer
from portunus.control.service import RuleService
from portunus.control.store import Store

from ..conftest import closing_each
from .fake_edge import FakeEdge, uri_parts

OPERATOR_TOKEN = "edge-test-operator-token-0123456789abcdefghijklmn"


@dataclass
class Edge:
    """The server side under test plus helpers to enroll and connect fake clients."""

    settings: Settings
    store: Store
    cert: ServerCert
    link: RemoteLink
    service: RuleService
    gateway: EdgeGateway
    server: RpcServer
    client: ControlCaller
    counts: list[int]
    edges: list[FakeEdge] = field(default_factory=list)

    @property
    def port(self) -> int:
        port = self.gateway.bound_port
        assert port is not None
        return port

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self.client.call(method, params)

    async def close(self) -> None:
        for f in self.edges:
            await f.close()
        await self.server.close()
        await self.gateway.close()
        await self.service.stop()

    def fake(self) -> FakeEdge:
        e = FakeEdge(self.port, self.cert.fingerprint)
        self.edges.append(e)
        return e

    async def enroll(
        self, name: str = "edge-01", **params: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Enroll over RPC and redeem over TLS; return (enrollment, enrolled frame)."""
        enrollment = await self.call(
            "clients.enroll", {"name": name, "address": "127.0.0.1", **params}
        )
        _, _, code, _ = uri_parts(enrollment["uri"])
        e = self.fake()
        enrolled = await e.enroll(code)
        await e.close()
        return enrollment, enrolled

    async def connect(
        self,
        name: str = "edge-01",
        caps: list[str] | None = None,
        auto: tuple[str, str | None] | None = ("active", None),
    ) -> tuple[FakeEdge, dict[str, Any]]:
        """Enroll and open a session; returns the fake (welcome consumed) and the enrolled frame."""
        _, enrolled = await self.enroll(name)
        e = self.fake()
        e.auto = auto
        welcome = await e.hello(enrolled["token"], enrolled["client_id"], caps)
        assert welcome["type"] == "welcome", welcome
        return e, enrolled


async def build_edge(settings: Settings, store: Store, local: Any, **gateway_kw: Any) -> Edge:
    await install_operator_token(store, OPERATOR_TOKEN)
    cert = ensure_server_cert(settings.data_dir, "127.0.0.1")
    counts: list[int] = []
    link = RemoteLink(on_count=counts.append)
    planes = DataPlanes(local, link)
    service = RuleService(store, planes, settings)
    local.events = service
    link.events = service
    service.start()
    gateway = EdgeGateway(store, link, cert.ssl_context(), "127.0.0.1", 0, **gateway_kw)
    await gateway.start()
    clients = ClientService(
        store, link, cert.fingerprint, "127.0.0.1", port=lambda: gateway.bound_port or 0
    )
    ctx = ControlContext(settings, store, Authenticator(store), service, planes, link, clients)
    server = RpcServer(settings.socket_path, Dispatcher(ctx))
    await server.start()
    client = ControlCaller(settings.socket_path, OPERATOR_TOKEN, timeout=10)
    return Edge(settings, store, cert, link, service, gateway, server, client, counts)


@pytest.fixture
async def make_edge(settings: Settings, store: Store, fake_plane: Any) -> AsyncIterator[Any]:
    """Factory for an edge setup with non-default gateway options; closed after the test."""
    async with closing_each(functools.partial(build_edge, settings, store, fake_plane)) as make:
        yield make


@pytest.fixture
async def edge(make_edge: Any) -> Edge:
    return await make_edge()
