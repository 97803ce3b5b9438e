"""Fixtures for the ``portunus-server serve`` end-to-end tests (see ServerProc in
tests/e2e/support.py).

- ``server``: factory ``server(shards=1, settings=None, env=None, ready=True,
  start=True, data_dir=None) -> ServerProc``; every tree is SIGKILLed at teardown.
- ``server_module``: the same, shared by a test module (for tests that only push
  and remove their own rules on their own ports).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import PortAllocator, ServerFactory


@pytest.fixture
def server(tmp_path: Path, ports: PortAllocator) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path, ports)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def server_module(tmp_path_factory: pytest.TempPathFactory, ports: PortAllocator) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path_factory.mktemp("server"), ports)
    try:
        yield factory
    finally:
        factory.close()
