"""Fixtures: a fake control socket, settings pointing at it, an API client over ASGI."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from portunus.config import Settings
from portunus.web.app import create_app

from .fakes import FakeControl


@pytest.fixture
def short_dir() -> Iterator[str]:
    """Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer."""
    path = tempfile.mkdtemp(prefix="pw-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def fake(short_dir: str) -> AsyncIterator[FakeControl]:
    ctl = FakeControl(f"{short_dir}/control.sock")
    await ctl.start()
    yield ctl
    await ctl.stop()


@pytest.fixture
def settings(short_dir: str) -> Settings:
    return Settings(data_dir=short_dir, runtime_dir=short_dir)


@pytest.fixture
async def api(fake: FakeControl, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as client:
        yield client


@pytest.fixture
def sequence() -> Callable[..., Callable[[dict[str, Any]], Any]]:
    """Replies that change call by call: the last one repeats."""

    def make(*replies: Any) -> Callable[[dict[str, Any]], Any]:
        queue = list(replies)

        def next_reply(params: dict[str, Any]) -> Any:
            return queue.pop(0) if len(queue) > 1 else queue[0]

        return next_reply

    return make
