"""Fixtures for the control process: a store in a temp dir, a fake data plane, and
the RPC server wired exactly like ``main.serve_control`` but with the fake; and
``spawn_control`` for the tests that run ``run_control`` in a real child process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from portunus.config import Settings
from portunus.control.auth import Authenticator, install_operator_token
from portunus.control.dataplane import DataPlaneEvents, LinkInfo, RuleResult
from portunus.control.rpc.caller import ControlCaller
from portunus.control.rpc.handlers import ControlContext, Dispatcher
from portunus.control.rpc.server import RpcServer
from portunus.control.service import RuleService
from portunus.control.store import Store
from portunus.errors import PortunusError
from portunus.rules import Rule

OPERATOR_TOKEN = "test-operator-token-0123456789abcdefghijklmnop"
REPO = Path(__file__).resolve().parents[3]
# The control process as the supervisor starts it: argv = channel fd, data dir,
# runtime dir, operator token, control_listen.


class FakePlane:
    """A data plane that records what it is sent and answers when told to.

    ``auto`` = ``("active", None)`` / ``("failed", reason)`` answers every upsert
    at once; ``None`` leaves answering to the test (ack timeouts)."""

    def __init__(self) -> None:
        self.online: set[str] = {"local"}
        self.sent: list[tuple[str, str, list[Rule], list[str]]] = []
        self.auto: tuple[str, str | None] | None = ("active", None)
        self.auto_remove = False
        self.events: DataPlaneEvents | None = None
        self.caps_sent: list[tuple[str, dict[str, dict[str, int]]]] = []
        self.capabilities: dict[str, list[str]] = {}

    def connected(self, client_id: str) -> bool:
        return client_id in self.online

    def info(self, client_id: str) -> LinkInfo | None:
        if client_id not in self.online:
            return None
        return LinkInfo(
            connected_since="2024-01-01T00:00:00.000Z",
            version="test",
            capabilities=self.capabilities.get(client_id, []),
        )

    async def apply(self, client_id: str, upsert: Sequence[Rule], remove: Sequence[str]) -> None:
        self.sent.append(("apply", client_id, list(upsert), list(remove)))
        if self.auto is not None and upsert:
            state, reason = self.auto
            self.answer(client_id, {r.id: (state, reason) for r in upsert})
        if self.auto_remove and remove:
            assert self.events is not None
            self.events.rules_removed(client_id, list(remove))

    async def sync(self, client_id: str, rules: Sequence[Rule]) -> None:
        self.sent.append(("sync", client_id, list(rules), []))

    async def owner_caps(self, client_id: str, caps: dict[str, dict[str, int]]) -> None:
        self.caps_sent.append((client_id, dict(caps)))

    def answer(self, client_id: str, results: dict[str, tuple[str, str | None]]) -> None:
        assert self.events is not None
        self.events.rules_applied(client_id, {k: RuleResult(s, r) for k, (s, r) in results.items()})

    def applies(self) -> list[tuple[str, str, list[Rule], list[str]]]:
        return [s for s in self.sent if s[0] == "apply"]


@dataclass
class Harness:
    settings: Settings
    store: Store
    plane: FakePlane
    service: RuleService
    server: RpcServer
    client: ControlCaller

    async def call(
        self, method: str, params: dict[str, Any] | None = None, token: str | None = None
    ) -> Any:
        return await self.client.call(method, params, token=token)

    async def close(self) -> None:
        await self.server.close()
        await self.service.stop()


class Closable(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


@contextlib.asynccontextmanager
async def closing_each(
    build: Callable[..., Awaitable[C]],
) -> AsyncIterator[Callable[..., Awaitable[C]]]:
    """The body of a factory fixture: the test gets ``make(**kw)`` (``build(**kw)``,
    remembered), and everything made is closed once the test is done."""
    built: list[C] = []

    async def make(**kw: Any) -> C:
        made = await build(**kw)
        built.append(made)
        return made

    try:
        yield make
    finally:
        for made in built:
            await made.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short temp dir: AF_UNIX paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ptn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings(short_dir: Path) -> Settings:
    s = Settings(data_dir=str(short_dir / "data"), runtime_dir=str(short_dir / "run"))
    s.ack_timeout_secs = 2.0
    return s


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    st = await Store.open(settings.db_path)
    yield st
    await st.close()


@pytest.fixture
def fake_plane() -> FakePlane:
    return FakePlane()


async def start_harness(
    settings: Settings, store: Store, plane: FakePlane, idle_timeout: float = 60.0
) -> Harness:
    await install_operator_token(store, OPERATOR_TOKEN)
    service = RuleService(store, plane, settings)
    plane.events = service
    service.start()
    ctx = ControlContext(settings, store, Authenticator(store), service, plane)
    server = RpcServer(settings.socket_path, Dispatcher(ctx), idle_timeout=idle_timeout)
    await server.start()
    return Harness(
        settings,
        store,
        plane,
        service,
        server,
        ControlCaller(settings.socket_path, OPERATOR_TOKEN, timeout=10),
    )


@pytest.fixture
async def make_harness(
    settings: Settings, store: Store, fake_plane: FakePlane
) -> AsyncIterator[Any]:
    """Factory for a harness with non-default server options; cleaned up after the test."""
    async with closing_each(functools.partial(start_harness, settings, store, fake_plane)) as make:
        yield make


@pytest.fixture
async def harness(make_harness: Any) -> Harness:
    return await make_harness()


async def expect_error(coro: Any, code: str) -> PortunusError:
    """Await ``coro`` expecting a PortunusError with ``code``; returns the error."""
    with pytest.raises(PortunusError) as info:
        await coro
    assert info.value.code == code, info.value.to_dict()
    return info.value


async def audit_trail(conn: Any) -> list[tuple[str, str, str, str | None]]:
    """The audit log oldest first, as ``(actor, action, outcome, error_code)``;
    ``conn`` is anything with the RPC ``call`` (a Harness, an Edge)."""
    entries = (await conn.call("audit.list", {"limit": 1000}))["entries"]
    return [(e["actor"], e["action"], e["outcome"], e["error_code"]) for e in reversed(entries)]


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Poll an async predicate until it is true (never sleep a fixed time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def poll() -> Any:
    return wait_for


# Users, sessions and grants: the ``rbac`` harness (tests/unit/control/rbac_harness.py).
from .rbac_harness import cheap_argon2, rbac  # noqa: E402, F401
