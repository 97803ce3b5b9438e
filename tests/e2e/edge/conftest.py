"""Fixtures for edge end-to-end tests: client processes (``clients``) and a fake
gateway (``gateway``) for the tests that pin down the client half alone; the real
server is the ``server`` fixture of tests/e2e/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.e2e.edge.clients import ClientFactory
from tests.e2e.support import PortAllocator
from tests.unit.edge.fake_server import ThreadedFakeServer, make_cert


@pytest.fixture
def clients(tmp_path: Path, ports: PortAllocator) -> Iterator[ClientFactory]:
    with closing(ClientFactory(tmp_path, ports)) as factory:
        yield factory


@pytest.fixture
def gateway(tmp_path: Path, ports: PortAllocator) -> Iterator[ThreadedFakeServer]:
    """A fake edge gateway on a reserved loopback port (so it can come back on it)."""
    cert = make_cert(tmp_path)
    g = ThreadedFakeServer(*cert, heartbeat_secs=1.0)
    g.call(g.server.start(ports.port()))
    try:
        yield g
    finally:
        g.close()
