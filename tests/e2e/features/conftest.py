"""Fixtures of the forwarding-feature tests (see helpers.py).

- ``server`` / ``server_module``: factory ``server(shards=1, settings=None) -> ServerProc``;
  every server is SIGKILLed (whole process group) at teardown.
- ``origin_at``: factory ``origin_at(handler, port=0) -> Origin`` for origins that
  must sit on a given port (range targets, a restarted primary); closed at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.features.helpers import ServerFactory
from tests.e2e.support import Handler, Origin, PortAllocator


@pytest.fixture
def server(tmp_path: Path, ports: PortAllocator) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path, ports)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def server_module(tmp_path_factory: pytest.TempPathFactory,
                  ports: PortAllocator) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path_factory.mktemp("server"), ports)
    try:
        yield factory
    finally:
        factory.close()


class _OriginsAt:
    def __init__(self) -> None:
        self.made: list[Origin] = []

    def __call__(self, handler: Handler, port: int = 0) -> Origin:
        o = Origin(handler, port=port)
        self.made.append(o)
        return o

    def close(self) -> None:
        for o in self.made:
            o.close()


@pytest.fixture
def origin_at() -> Iterator[Callable[..., Origin]]:
    made = _OriginsAt()
    yield made
    made.close()
