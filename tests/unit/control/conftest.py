"""Fixtures for the control process: a store in a temp dir."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from portunus.config import Settings
from portunus.control.store import Store

OPERATOR_TOKEN = "test-operator-token-0123456789abcdefghijklmnop"


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
