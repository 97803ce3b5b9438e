"""Fixtures for end-to-end tests against real Portunus processes (see support/).

- ``ports``: session-wide PortAllocator (``ports.port()``, ``ports.ports(n)``, ``ports.block(n)``).
- ``origin`` / ``origin_at``: factory ``origin(handler, port=0) -> Origin``; every
  origin is closed at teardown.
- ``standalone``: factory ``standalone(rules, shards=1, settings=None, env=None,
  splice=True, ready=True) -> StandaloneProc``.
- ``server``: factory ``server(shards=1, settings=None, env=None, ready=True,
  start=True, data_dir=None, wrap=None) -> ServerProc``.
- ``origin_module`` / ``standalone_module`` / ``server_module``: the same, shared
  by a test module (for tests that only use their own rules on their own ports).

Every process tree a factory started is SIGKILLed at teardown, whatever the
test's outcome.  After every test, every log line of every process is scanned for
the secrets the test met (support/secrets.py); one found fails the test.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # so test modules can `from tests.e2e.support import ...`

from tests.e2e.support import (  # noqa: E402
    WATCH,
    OriginFactory,
    PortAllocator,
    ServerFactory,
    StandaloneFactory,
)


@pytest.fixture(autouse=True)
def _no_secrets_in_logs() -> Iterator[None]:
    """After every e2e test: no log line of any process holds a secret the tests
    came to know (operator token, enrollment codes, client tokens; support/secrets.py)."""
    yield
    leaks = WATCH.scan()
    if leaks:
        pytest.fail("secrets in logs:\n" + "\n".join(leaks), pytrace=False)


def _raise_fd_limit() -> None:
    """Every port the session hands out stays reserved (one lock socket each) until the
    session ends, so a full run holds well over 1,024 fds: lift the soft limit to the
    hard one, as the supervisor does for its own processes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@pytest.fixture(scope="session")
def ports() -> Iterator[PortAllocator]:
    _raise_fd_limit()
    with closing(PortAllocator()) as alloc:
        yield alloc


@pytest.fixture
def origin() -> Iterator[OriginFactory]:
    with closing(OriginFactory()) as made:
        yield made


@pytest.fixture
def origin_at(origin: OriginFactory) -> OriginFactory:
    """``origin``, under the name the tests that pass a port use."""
    return origin


@pytest.fixture(scope="module")
def origin_module() -> Iterator[OriginFactory]:
    with closing(OriginFactory()) as made:
        yield made


@pytest.fixture
def standalone(tmp_path: Path, ports: PortAllocator) -> Iterator[StandaloneFactory]:
    with closing(StandaloneFactory(tmp_path, ports)) as factory:
        yield factory


@pytest.fixture(scope="module")
def standalone_module(
    tmp_path_factory: pytest.TempPathFactory, ports: PortAllocator
) -> Iterator[StandaloneFactory]:
    with closing(StandaloneFactory(tmp_path_factory.mktemp("standalone"), ports)) as factory:
        yield factory


@pytest.fixture
def server(tmp_path: Path, ports: PortAllocator) -> Iterator[ServerFactory]:
    with closing(ServerFactory(tmp_path, ports)) as factory:
        yield factory


@pytest.fixture(scope="module")
def server_module(
    tmp_path_factory: pytest.TempPathFactory, ports: PortAllocator
) -> Iterator[ServerFactory]:
    with closing(ServerFactory(tmp_path_factory.mktemp("server"), ports)) as factory:
        yield factory
