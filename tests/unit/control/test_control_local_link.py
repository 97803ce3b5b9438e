"""The local link against a fake supervisor on the other end of a socketpair."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from portunus.control.dataplane import RuleResult
from portunus.control.local_link import LocalLink
from portunus.ipc.framing import Channel
from portunus.ipc.messages import as_dict
from portunus.ipc.messages import from_dict as message
from portunus.rules import Target, build_rule


class Recorder:
    def __init__(self) -> None:
        self.applied: list[tuple[str, dict[str, RuleResult]]] = []
        self.removed: list[tuple[str, list[str]]] = []
        self.connected: list[str] = []

    def rules_applied(self, client_id: str, results: dict[str, RuleResult]) -> None:
        self.applied.append((client_id, results))

    def rules_removed(self, client_id: str, ids: list[str]) -> None:
        self.removed.append((client_id, ids))

    def client_connected(self, client_id: str) -> None:
        self.connected.append(client_id)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    for s in (a, b):
        s.close()


async def frames_from(chan: Channel, n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + 5
    while len(got) < n:
        got += [as_dict(m) for m, _ in chan.read()]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {len(got)} of {n} frames")
        await asyncio.sleep(0.005)
    return got


async def until(cond: Any) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.005)


async def test_apply_sync_and_answers(
    pair: tuple[socket.socket, socket.socket], capfd: pytest.CaptureFixture[str]
) -> None:
    ours, theirs = pair
    closed: list[str] = []
    rec = Recorder()
    link = LocalLink(ours, on_close=closed.append, events=rec)
    link.start()
    sup = Channel(theirs)
    rule = build_rule(
        id="12", protocol="tcp", listen=(8080, 8080), targets=[Target("127.0.0.1", 80)]
    )
    assert link.connected("local") and not link.connected("edge")
    await link.sync("local", [rule])
    await link.apply("local", [rule], ["3"])
    sync, apply = await frames_from(sup, 2)
    assert sync["type"] == "sync" and sync["rules"] == [rule.to_wire()]
    assert apply == {
        "type": "apply",
        "seq": sync["seq"] + 1,
        "upsert": [rule.to_wire()],
        "remove": ["3"],
    }
    sup.send(message({"type": "hello", "version": 1, "shards": 2}))
    sup.send(
        message(
            {
                "type": "applied",
                "seq": apply["seq"],
                "results": {
                    "12": {"state": "failed", "reason": "port_in_use (port 8080 already bound)"}
                },
            }
        )
    )
    sup.send(message({"type": "removed", "ids": ["3"]}))
    await link.apply("local", [], ["4"])  # remove-only: answered with empty results
    (remove_only,) = await frames_from(sup, 1)
    sup.send(message({"type": "applied", "seq": remove_only["seq"], "results": {}}))
    sup.send(message({"type": "applied", "seq": sync["seq"], "results": {}}))
    await until(lambda: len(rec.applied) == 3)
    assert "unexpected_seq" not in capfd.readouterr().err
    sup.send(message({"type": "applied", "seq": 999, "results": {}}))
    await until(lambda: len(rec.applied) == 4)
    assert "unexpected_seq" in capfd.readouterr().err
    assert rec.applied[0] == (
        "local",
        {"12": RuleResult("failed", "port_in_use (port 8080 already bound)")},
    )
    assert rec.removed == [("local", ["3"])]
    assert closed == []
    info = link.info("local")
    assert info is not None and "sni" in info.capabilities
    link.close()


async def test_large_sync_is_flushed_by_the_writer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    link = LocalLink(ours, on_close=lambda why: None, events=Recorder())
    link.start()
    many = [
        build_rule(
            id=str(i),
            protocol="tcp",
            listen=(1000 + i, 1000 + i),
            targets=[Target(f"host-{i}.example", 80)] * 8,
        )
        for i in range(3000)
    ]
    await link.sync("local", many)  # several MB: more than the socket buffer holds
    (frame,) = await frames_from(Channel(theirs), 1)
    assert len(frame["rules"]) == 3000
    link.close()


async def test_channel_close_reports_once(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    closed: list[str] = []
    link = LocalLink(ours, on_close=closed.append, events=Recorder())
    link.start()
    theirs.close()
    await until(lambda: closed)
    assert not link.connected("local")
    await link.apply("local", [], ["1"])  # dropped quietly: the node gets the full set later
    assert len(closed) == 1 and "closed" in closed[0]
    link.close()


async def test_garbage_from_supervisor_closes(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    closed: list[str] = []
    link = LocalLink(ours, on_close=closed.append, events=Recorder())
    link.start()
    theirs.sendall(b"\x00\x00\x00\x03\x00\x00abc")  # header: length 3, no fds
    await until(lambda: closed)
    assert "bad frame" in closed[0]
    link.close()
