"""The link child's logic (EdgeLink) between a fake gateway and a fake supervisor.

Timings are shrunk (LinkTiming) so heartbeats, dead-link detection and backoff
run in tenths of a second; the protocol and the files are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from portunus.edge import revoked
from portunus.edge.bundle import Bundle, read_bundle, write_bundle
from portunus.edge.link import EXIT_HALT, EdgeLink, link_cadence
from portunus.edge.rulestore import RuleStore
from portunus.edge.timing import LinkTiming
from portunus.ipc import edge_messages as em
from portunus.ipc.edge_wire import CAPABILITIES

from .conftest import FakeSupervisor, bundle_for
from .fake_server import FakeEdgeServer, wire_rule

FAST = LinkTiming(
    heartbeat_secs=0.1,
    dead_secs=0.6,
    stats_secs=0.1,
    backoff_first=0.05,
    backoff_max=0.2,
    connect_timeout=2,
    handshake_timeout=2,
)
CID = "01HCLIENT"


class Running:
    def __init__(self, link: EdgeLink, task: asyncio.Task[int], sup: FakeSupervisor) -> None:
        self.link, self.task, self.sup = link, task, sup

    async def exit_code(self, timeout: float = 5.0) -> int:
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)


@pytest.fixture
async def start(
    tmp_path: Path, sup_pair: tuple[socket.socket, FakeSupervisor]
) -> AsyncIterator[Callable[..., Running]]:
    sock, sup = sup_pair
    running: list[Running] = []

    def _start(
        bundle: Bundle, capabilities: list[str] | None = None, timing: LinkTiming = FAST
    ) -> Running:
        (tmp_path / "metrics").mkdir(exist_ok=True)
        link = EdgeLink(
            bundle,
            str(tmp_path),
            sock,
            capabilities or list(CAPABILITIES),
            str(tmp_path / "metrics"),
            timing,
        )
        r = Running(link, asyncio.create_task(link.run()), sup)
        running.append(r)
        return r

    yield _start
    for r in running:
        r.link.stop(0, "test over")
        await asyncio.gather(r.task, return_exceptions=True)


async def connected(fake: FakeEdgeServer, r: Running, cid: str = CID) -> dict[str, Any]:
    """Wait for the session; answer the start-up sync and the server's sync; return the latter."""
    local = await r.sup.next("sync")
    r.sup.answer(local)
    await fake.wait(lambda: fake.connected(cid))
    synced = await r.sup.next("sync", after=r.sup.got.index(local) + 1)
    r.sup.answer(synced)
    await fake.wait(lambda: fake.frames(cid, "applied"))
    return synced


def json_logs(text: str, event: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{") and f'"event":"{event}"' in line:
            out.append(json.loads(line))
    return out


@pytest.fixture(autouse=True)
def _quick_server_pings(fake: FakeEdgeServer) -> None:
    fake.heartbeat_secs = 0.1


async def test_cached_rules_reach_the_supervisor_while_the_server_is_down(
    fake: FakeEdgeServer, start: Callable[..., Running], tmp_path: Path
) -> None:
    bundle = bundle_for(fake)
    RuleStore(str(tmp_path), CID).replace([wire_rule("4", 20004)])
    await fake.stop()
    r = start(bundle)
    first = await r.sup.next("sync")
    assert [x["id"] for x in first["rules"]] == ["4"]
    r.sup.answer(first)
    await asyncio.sleep(0.3)  # a few failed connects later, still running
    assert not r.task.done()
    r.link.stop(0, "done")
    assert await r.exit_code() == 0


async def test_cache_of_another_client_is_ignored(
    fake: FakeEdgeServer, start: Callable[..., Running], tmp_path: Path
) -> None:
    RuleStore(str(tmp_path), "01HSOMEONEELSE").replace([wire_rule("4", 20004)])
    r = start(bundle_for(fake))
    assert (await r.sup.next("sync"))["rules"] == []


async def test_hello_sync_apply_and_answers_are_relayed(
    fake: FakeEdgeServer, start: Callable[..., Running], tmp_path: Path
) -> None:
    r = start(bundle_for(fake), capabilities=["tcp", "udp"])
    await connected(fake, r)
    hello = fake.clients[CID].hellos[0]
    assert (hello["token"], hello["client_id"], hello["capabilities"]) == (
        f"token-{CID}",
        CID,
        ["tcp", "udp", "quiet_link"],
    )
    applied = fake.frames(CID, "applied")
    assert len(applied) == 1, "the answer to the start-up sync must not reach the server"

    mark = len(r.sup.got)
    seq = await fake.push(CID, upsert=[wire_rule("5", 20005)])
    apply = await r.sup.next("apply", after=mark)
    assert [x["id"] for x in apply["upsert"]] == ["5"] and apply["remove"] == []
    rules_file = tmp_path / "rules.json"
    assert [x["id"] for x in json.loads(rules_file.read_text())["rules"]] == [
        "5"
    ]  # persisted before sending
    assert stat.S_IMODE(rules_file.stat().st_mode) == 0o600
    r.sup.answer(apply)
    ack = await fake.wait(lambda: [a for a in fake.frames(CID, "applied") if a["seq"] == seq])
    assert ack[0]["results"] == {"5": {"state": "active", "reason": None}}

    mark = len(r.sup.got)
    await fake.push(CID, remove=["5"])
    apply = await r.sup.next("apply", after=mark)
    assert apply["remove"] == ["5"]
    r.sup.answer(apply)
    r.sup.send({"type": "removed", "ids": ["5"]})
    await fake.wait(lambda: fake.frames(CID, "removed"))
    assert fake.frames(CID, "removed")[0]["ids"] == ["5"]
    assert json.loads(rules_file.read_text())["rules"] == []


async def test_a_malformed_rule_fails_alone(
    fake: FakeEdgeServer, start: Callable[..., Running]
) -> None:
    r = start(bundle_for(fake))
    await connected(fake, r)
    mark = len(r.sup.got)
    seq = await fake.push(CID, upsert=[wire_rule("6", 20006), {"id": "7", "protocol": "tcp"}])
    apply = await r.sup.next("apply", after=mark)
    assert [x["id"] for x in apply["upsert"]] == ["6"]
    r.sup.answer(apply)
    ack = await fake.wait(lambda: [a for a in fake.frames(CID, "applied") if a["seq"] == seq])
    assert ack[0]["results"]["6"]["state"] == "active"
    assert ack[0]["results"]["7"]["state"] == "failed"
    assert "malformed" in ack[0]["results"]["7"]["reason"]


async def test_pings_and_stats_flow(fake: FakeEdgeServer, start: Callable[..., Running]) -> None:
    bundle_for(fake)
    fake.clients[CID].rules = {"8": wire_rule("8", 20008)}
    r = start(bundle_for(fake))
    await connected(fake, r)
    await fake.wait(lambda: len(fake.frames(CID, "ping")) >= 3)
    stats = await fake.wait(lambda: fake.frames(CID, "stats"))
    assert stats[-1]["rules"] == {
        "8": {"bytes_in": 0, "bytes_out": 0, "connections_total": 0, "active_connections": 0}
    }
    # Idle counters are not sent again: one stats frame while many pings flow.
    pings = len(fake.frames(CID, "ping"))
    await fake.wait(lambda: len(fake.frames(CID, "ping")) >= pings + 5)
    assert len(fake.frames(CID, "stats")) == 1


def _welcome(**cadence: Any) -> em.Welcome:
    """A welcome frame as it comes off the wire, with these cadence fields."""
    frame = em.parse({"type": "welcome", "client_id": CID, "client_name": "edge-01", **cadence})
    assert isinstance(frame, em.Welcome)
    return frame


def test_link_cadence_from_the_welcome() -> None:
    timing = LinkTiming()
    assert link_cadence(_welcome(heartbeat_secs=5), timing) == (5.0, 15.0)  # an older server
    assert link_cadence(_welcome(), timing) == (5.0, 15.0)
    assert link_cadence(_welcome(heartbeat_secs=20, ping_secs=20, dead_after_secs=30), timing) == (
        20.0,
        30.0,
    )
    assert link_cadence(_welcome(heartbeat_secs=10, ping_secs=25), timing) == (10.0, 60.0)
    assert link_cadence(_welcome(heartbeat_secs=True, ping_secs=-1), timing) == (5.0, 15.0)
    assert link_cadence(_welcome(heartbeat_secs=0.1, ping_secs=0.2), FAST) == (0.1, 0.6)


async def test_a_silent_server_is_declared_dead_and_redialled(
    fake: FakeEdgeServer, start: Callable[..., Running], capfd: pytest.CaptureFixture[str]
) -> None:
    r = start(bundle_for(fake))
    await connected(fake, r)
    loop = asyncio.get_running_loop()
    fake.silent = True
    t0 = loop.time()
    await fake.wait(lambda: fake.clients[CID].connects >= 2, timeout=5)
    elapsed = loop.time() - t0
    assert FAST.dead_secs * 0.9 <= elapsed <= FAST.dead_secs + FAST.backoff_max * 1.2 + 1.0
    assert json_logs(capfd.readouterr().err, "link.dead")


async def test_reconnect_resyncs_and_delivers_removals_made_while_away(
    fake: FakeEdgeServer, start: Callable[..., Running]
) -> None:
    bundle_for(fake)
    fake.clients[CID].rules = {"1": wire_rule("1", 20001), "2": wire_rule("2", 20002)}
    r = start(bundle_for(fake))
    synced = await connected(fake, r)
    assert sorted(x["id"] for x in synced["rules"]) == ["1", "2"]
    port = fake.port
    await fake.stop()
    # While the server is away: its rule 2 is removed, and the data plane finishes draining rule 9.
    fake.clients[CID].rules.pop("2")
    await fake.wait(lambda: r.link._session is None)
    mark = len(r.sup.got)
    r.sup.send({"type": "removed", "ids": ["9"]})
    await asyncio.sleep(0.2)
    await fake.start(port)
    await fake.wait(lambda: fake.clients[CID].connects == 2, timeout=5)
    resync = await r.sup.next("sync", after=mark)
    assert [x["id"] for x in resync["rules"]] == ["1"]  # the supervisor drains 2
    await fake.wait(lambda: any(f["ids"] == ["9"] for f in fake.frames(CID, "removed")))


async def test_an_answer_for_a_dead_session_is_not_relayed(
    fake: FakeEdgeServer, start: Callable[..., Running]
) -> None:
    r = start(bundle_for(fake))
    await connected(fake, r)
    mark = len(r.sup.got)
    await fake.push(CID, upsert=[wire_rule("3", 20003)])
    old = await r.sup.next("apply", after=mark)
    port = fake.port
    await fake.stop()
    await asyncio.sleep(0.1)
    await fake.start(port)
    await fake.wait(lambda: fake.clients[CID].connects == 2, timeout=5)
    before = len(fake.frames(CID, "applied"))
    r.sup.answer(old)  # late: its session is gone
    resync = await r.sup.next("sync", after=mark)
    r.sup.answer(resync)
    await fake.wait(lambda: len(fake.frames(CID, "applied")) == before + 1)
    await asyncio.sleep(0.1)
    assert len(fake.frames(CID, "applied")) == before + 1


async def test_revoked_mid_session_stops_for_good(
    fake: FakeEdgeServer, start: Callable[..., Running], tmp_path: Path
) -> None:
    bundle_for(fake)
    fake.clients[CID].rules = {"1": wire_rule("1", 20001)}
    r = start(bundle_for(fake))
    await connected(fake, r)
    assert (tmp_path / "rules.json").exists()
    await fake.revoke(CID)
    assert await r.exit_code() == EXIT_HALT
    assert not (tmp_path / "rules.json").exists()
    marker = revoked.read_marker(str(tmp_path), CID)
    assert marker is not None and marker["message"] == "revoked by the operator"
    n = fake.connections
    await asyncio.sleep(0.4)
    assert fake.connections == n, "a revoked client must not dial again"


async def test_revoked_at_hello(
    fake: FakeEdgeServer, start: Callable[..., Running], tmp_path: Path
) -> None:
    bundle = bundle_for(fake)
    fake.clients[CID].revoked = True
    r = start(bundle)
    assert await r.exit_code() == EXIT_HALT
    assert revoked.read_marker(str(tmp_path), CID) is not None
    assert revoked.read_marker(str(tmp_path), "01HOTHER") is None


async def test_unauthenticated_keeps_forwarding_and_retrying(
    fake: FakeEdgeServer, start: Callable[..., Running], capfd: pytest.CaptureFixture[str]
) -> None:
    bundle = bundle_for(fake)
    bundle.token = "not-the-token"
    r = start(bundle)
    await fake.wait(lambda: fake.connections >= 3, timeout=5)
    assert not r.task.done()
    refused = json_logs(capfd.readouterr().err, "link.refused")
    assert refused and refused[0]["code"] == "unauthenticated"


async def test_a_changed_server_certificate_gets_nothing(
    fake: FakeEdgeServer, start: Callable[..., Running], capfd: pytest.CaptureFixture[str]
) -> None:
    bundle = bundle_for(fake)
    pinned = "sha256:" + "00" * 32
    bundle.fingerprint = pinned
    r = start(bundle)
    await fake.wait(lambda: fake.connections >= 2, timeout=5)
    assert fake.clients[CID].hellos == [] and not r.task.done()
    rec = json_logs(capfd.readouterr().err, "link.fingerprint_mismatch")[0]
    assert (rec["expected"], rec["got"]) == (pinned, fake.fingerprint)
    assert pinned in rec["error"] and fake.fingerprint in rec["error"]


async def test_rename_is_written_to_the_bundle(
    fake: FakeEdgeServer, start: Callable[..., Running], tmp_path: Path
) -> None:
    path = tmp_path / "client.json"
    bundle = bundle_for(fake, path=str(path))
    write_bundle(str(path), bundle)
    r = start(bundle)
    await connected(fake, r)
    await fake.send(CID, {"type": "renamed", "client_name": "edge-paris"})
    await fake.wait(lambda: read_bundle(str(path)).client_name == "edge-paris")
    assert fake.clients[CID].connects == 1  # no reconnect
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_a_name_changed_while_away_arrives_in_the_welcome(
    fake: FakeEdgeServer, start: Callable[..., Running], tmp_path: Path
) -> None:
    path = tmp_path / "client.json"
    bundle = bundle_for(fake, path=str(path))
    write_bundle(str(path), bundle)
    fake.clients[CID].name = "edge-lyon"
    start(bundle)
    await fake.wait(lambda: read_bundle(str(path)).client_name == "edge-lyon")


async def test_unknown_frames_are_ignored(
    fake: FakeEdgeServer, start: Callable[..., Running]
) -> None:
    r = start(bundle_for(fake))
    await connected(fake, r)
    await fake.send(CID, {"type": "from-the-future", "x": 1})
    mark = len(r.sup.got)
    await fake.push(CID, upsert=[wire_rule("5", 20005)])
    await r.sup.next("apply", after=mark)
    assert fake.clients[CID].connects == 1


async def test_losing_the_supervisor_ends_the_link(
    fake: FakeEdgeServer,
    start: Callable[..., Running],
    sup_pair: tuple[socket.socket, FakeSupervisor],
) -> None:
    r = start(bundle_for(fake))
    await r.sup.next("sync")
    sup_pair[1].chan.sock.close()
    assert await r.exit_code() == 1
