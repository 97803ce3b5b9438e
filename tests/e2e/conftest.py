"""Fixtures for end-to-end tests against real Portunus processes (see support.py).

- ``ports``: session-wide PortAllocator (``ports.port()``, ``ports.ports(n)``, ``ports.block(n)``).
- ``origin``: factory ``origin(handler) -> Origin``; every origin is closed at teardown.
- ``standalone``: factory ``standalone(rules, shards=1, settings=None, env=None,
  splice=True, ready=True) -> StandaloneProc``; every process tree is SIGKILLed at
  teardown, whatever the test's outcome.
- ``standalone_module`` / ``origin_module``: the same, shared by a test module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # so test modules can `from tests.e2e.support import ...`

from tests.e2e.support import Handler, Origin, PortAllocator, StandaloneFactory  # noqa: E402


@pytest.fixture(scope="session")
def ports() -> Iterator[PortAllocator]:
    alloc = PortAllocator()
    yield alloc
    alloc.close()


class _Origins:
    def __init__(self) -> None:
        self.origins: list[Origin] = []

    def __call__(self, handler: Handler) -> Origin:
        o = Origin(handler)
        self.origins.append(o)
        return o

    def close(self) -> None:
        for o in self.origins:
            o.close()


@pytest.fixture
def origin() -> Iterator[Callable[[Handler], Origin]]:
    made = _Origins()
    yield made
    made.close()


@pytest.fixture(scope="module")
def origin_module() -> Iterator[Callable[[Handler], Origin]]:
    made = _Origins()
    yield made
    made.close()


@pytest.fixture
def standalone(tmp_path: Path, ports: PortAllocator) -> Iterator[StandaloneFactory]:
    factory = StandaloneFactory(tmp_path, ports)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def standalone_module(tmp_path_factory: pytest.TempPathFactory,
                      ports: PortAllocator) -> Iterator[StandaloneFactory]:
    factory = StandaloneFactory(tmp_path_factory.mktemp("standalone"), ports)
    try:
        yield factory
    finally:
        factory.close()
