"""Fixtures for edge end-to-end tests: client processes (``clients``), the real
server (``server``, from tests/e2e/features/helpers.py), and a fake gateway
(``gateway``) for the tests that pin down the client half alone."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[3]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.e2e.edge.clients import ClientFactory  # noqa: E402
from tests.e2e.features.helpers import ServerFactory  # noqa: E402
from tests.e2e.support import PortAllocator  # noqa: E402
from tests.unit.edge.fake_server import ThreadedFakeServer, make_cert  # noqa: E402


@pytest.fixture
def clients(tmp_path: Path, ports: PortAllocator) -> Iterator[ClientFactory]:
    factory = ClientFactory(tmp_path, ports)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def server(tmp_path: Path, ports: PortAllocator) -> Iterator[ServerFactory]:
    """``portunus-server serve`` on loopback ports (control_listen included)."""
    factory = ServerFactory(tmp_path, ports)
    try:
        yield factory
    finally:
        factory.close()


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
