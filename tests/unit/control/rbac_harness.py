"""A control RPC server with users: the ``harness`` of conftest plus an
injectable clock, a cheap Argon2id (still Argon2id: the parameters only), and
helpers to make users and log them in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from argon2 import PasswordHasher

from portunus.config import Settings
from portunus.control import passwords
from portunus.control.auth import Authenticator, install_operator_token
from portunus.control.rpc.caller import ControlCaller
from portunus.control.rpc.handlers import ControlContext, Dispatcher
from portunus.control.rpc.server import RpcServer
from portunus.control.service import RuleService
from portunus.control.store import Store

from .conftest import OPERATOR_TOKEN, FakePlane

PASSWORD = "correct horse battery"


class Clock:
    """Unix seconds that move only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, secs: float) -> None:
        self.now += secs


@dataclass
class Rbac:
    settings: Settings
    store: Store
    plane: FakePlane
    service: RuleService
    server: RpcServer
    clock: Clock
    ctx: ControlContext

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        token: str | None = OPERATOR_TOKEN,
        session: str | None = None,
        csrf: bool = False,
    ) -> Any:
        client = ControlCaller(self.settings.socket_path, None, timeout=10)
        return await client.call(method, params, token=token, session=session, csrf=csrf)

    async def user(self, user_id: str, role: str = "user", password: str | None = PASSWORD) -> str:
        """Create a user and return a fresh API token acting as it."""
        body: dict[str, Any] = {"user_id": user_id, "role": role}
        if password is not None:
            body["password"] = password
        await self.call("users.add", body)
        return str((await self.call("tokens.issue", {"user_id": user_id}))["token"])

    async def login(self, user_id: str, password: str = PASSWORD, source: str = "127.0.0.1") -> str:
        answer = await self.call(
            "auth.login", {"user_id": user_id, "password": password, "source": source}, token=None
        )
        return str(answer["session_token"])

    async def close(self) -> None:
        await self.server.close()
        await self.service.stop()


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2id with tiny costs: the tests hash dozens of passwords."""
    monkeypatch.setattr(
        passwords, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )
    passwords._dummy_hash.cache_clear()


@pytest.fixture
async def rbac(settings: Settings, store: Store, fake_plane: FakePlane) -> AsyncIterator[Rbac]:
    clock = Clock()
    await install_operator_token(store, OPERATOR_TOKEN)
    service = RuleService(store, fake_plane, settings)
    fake_plane.events = service
    service.start()
    ctx = ControlContext(settings, store, Authenticator(store, clock), service, fake_plane)
    server = RpcServer(settings.socket_path, Dispatcher(ctx))
    await server.start()
    harness = Rbac(settings, store, fake_plane, service, server, clock, ctx)
    yield harness
    await harness.close()
