"""supervisor/fdstore.py without systemd: which inherited sockets are adopted."""

from __future__ import annotations

import socket

import pytest

from portunus.supervisor.fdstore import FdStore


def _listener(port: int = 0) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> FdStore:
    monkeypatch.delenv("PORTUNUS_FDSTORE", raising=False)
    return FdStore()  # inactive: nothing is sent anywhere


def test_adopts_matching_sockets_up_to_the_shard_count(store: FdStore) -> None:
    a = _listener()
    port = a.getsockname()[1]
    b, c = _listener(port), _listener(port)
    store.inherited[f"tcp/{port}"] = [a, b, c]
    kept = store.adopt(f"tcp/{port}", "tcp", "127.0.0.1", port, count=2)
    assert kept == [a, b]
    assert c.fileno() == -1  # one shard fewer now: the extra socket is closed
    assert f"tcp/{port}" not in store.inherited
    for s in kept:
        s.close()


def test_a_changed_address_or_protocol_is_not_adopted(store: FdStore) -> None:
    a = _listener()
    port = a.getsockname()[1]
    store.inherited["tcp/1"] = [a]
    assert store.adopt("tcp/1", "tcp", "127.0.0.1", port + 1) == []  # another port
    assert a.fileno() == -1
    b = _listener()
    store.inherited["udp/x"] = [b]
    assert store.adopt("udp/x", "udp", "127.0.0.1", b.getsockname()[1]) == []  # a TCP socket


def test_unclaimed_sockets_are_dropped(store: FdStore) -> None:
    a = _listener()
    store.inherited["tcp/9"] = [a]
    store.drop_unclaimed()
    assert a.fileno() == -1 and store.inherited == {}
