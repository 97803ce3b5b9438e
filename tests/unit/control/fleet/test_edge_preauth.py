"""What an unauthenticated peer may cost the gateway (control.fleet.preauth): the
first-frame limit, the anonymous connection limits, one deadline for the TLS
handshake and the first frame, and the slot given back on authentication."""

from __future__ import annotations

import asyncio
import resource
import socket
import ssl
import struct
import time
from typing import Any

from portunus.control.fleet.listener import PARK_MAX, Parking, park_capacity
from portunus.control.fleet.preauth import (
    DEFAULT_PARK_SECS,
    PREAUTH_MAX_FRAME,
    AuditBudget,
    PreauthLimits,
)
from portunus.ipc.edge_wire import encode_frame


def _tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> float:
    """Seconds until the server closes (EOF or reset); fails if it stays open."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except (ConnectionError, ssl.SSLError):
        pass
    return time.monotonic() - start


async def _tcp(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def test_limits_count_globally_and_per_source() -> None:
    refused: list[str] = []
    limits = PreauthLimits(max_connections=3, max_per_source=2, on_refused=refused.append)
    a1, a2 = limits.admit("10.0.0.1"), limits.admit("10.0.0.1")
    assert limits.admit("10.0.0.1") == "max_per_source"
    b1 = limits.admit("10.0.0.2")
    # No slot is waiting for a handshake (none has ``on_evict``): nothing to reclaim.
    assert limits.admit("10.0.0.3") == "max_connections"
    assert not isinstance(a1, str) and not isinstance(a2, str) and not isinstance(b1, str)
    a1.release()
    a1.release()  # idempotent: released on authentication and again at close
    assert limits.open == 2 and limits.per_source == {"10.0.0.1": 1, "10.0.0.2": 1}
    assert not isinstance(limits.admit("10.0.0.3"), str)
    a2.release()
    b1.release()
    assert limits.per_source == {"10.0.0.3": 1}
    limits.refused("timeout", "10.0.0.9:1")
    assert refused == ["timeout"]


def test_at_the_global_limit_the_longest_waiting_slot_is_reclaimed() -> None:
    limits = PreauthLimits(max_connections=3, max_per_source=2)
    evicted: list[str] = []
    slots = [limits.admit(src) for src in ("10.0.0.1", "10.0.0.2", "10.0.0.2")]
    assert not any(isinstance(s, str) for s in slots)
    first, second, third = slots  # type: ignore[misc]
    first.on_evict = None  # e.g. already enrolling: not reclaimable
    second.on_evict = lambda: evicted.append("second")
    third.on_evict = lambda: evicted.append("third")
    # A source at its own quota reclaims nothing.
    assert limits.admit("10.0.0.2") == "max_per_source"
    assert evicted == []
    fourth = limits.admit("10.0.0.3")
    assert not isinstance(fourth, str)
    assert evicted == ["second"] and second.evicted and not third.evicted
    assert limits.open == 3 and limits.per_source == {
        "10.0.0.1": 1,
        "10.0.0.2": 1,
        "10.0.0.3": 1,
    }
    second.release()  # the gateway's own release afterwards changes nothing
    assert limits.open == 3
    fifth = limits.admit("10.0.0.4")
    assert not isinstance(fifth, str) and evicted == ["second", "third"]
    assert limits.admit("10.0.0.5") == "max_connections"  # only unreclaimable ones left


async def test_oversized_first_frame_closes_without_reading_the_body(make_edge: Any) -> None:
    refused: list[str] = []
    edge = await make_edge(preauth=PreauthLimits(on_refused=refused.append))
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port, ssl=_tls())
    # Only the header: a gateway that waited for the announced body would stay open.
    writer.write(struct.pack(">I", PREAUTH_MAX_FRAME + 1))
    await writer.drain()
    assert await _until_closed(reader) < 2.0
    assert refused == ["frame_too_large"]
    assert edge.gateway.preauth.open == 0
    writer.close()


async def test_largest_first_frame_allowed_is_read(make_edge: Any) -> None:
    edge = await make_edge()
    e = edge.fake()
    await e.connect()
    msg = {"type": "hello", "token": "not-a-token", "pad": ""}
    msg["pad"] = "x" * (PREAUTH_MAX_FRAME - len(encode_frame(msg)) + 4)
    assert len(encode_frame(msg)) - 4 == PREAUTH_MAX_FRAME
    await e.send(msg)
    reply = await e.recv()
    assert reply["type"] == "error" and reply["code"] == "unauthenticated"


async def test_after_hello_the_normal_limit_applies_and_the_slot_is_free(
    make_edge: Any, poll: Any
) -> None:
    edge = await make_edge()
    e, enrolled = await edge.connect("edge-01")
    assert edge.gateway.preauth.open == 0  # authenticated: no longer counted
    await e.send({"type": "future-feature", "pad": "x" * (64 * PREAUTH_MAX_FRAME)})
    await e.send({"type": "ping"})
    await asyncio.sleep(0.2)
    assert edge.link.connected(enrolled["client_id"]) and not e.closed.is_set()


async def test_over_the_global_limit_the_longest_waiting_connection_makes_room(
    make_edge: Any, poll: Any
) -> None:
    refused: list[str] = []
    edge = await make_edge(
        preauth=PreauthLimits(max_connections=2, max_per_source=10, on_refused=refused.append)
    )
    held = [await _tcp(edge.port) for _ in range(2)]

    async def both_admitted() -> bool:
        return edge.gateway.preauth.open == 2

    async def one_held() -> bool:
        return edge.gateway.preauth.open == 1

    await poll(both_admitted)
    # A real client still enrolls and connects (two connections): each time, with
    # every slot held, the oldest silent connection is closed for it.
    _, enrolled = await edge.enroll("edge-01")
    assert await _until_closed(held[0][0]) < 1.0
    await poll(one_held)  # the enrollment's connection ended: fill the slot again
    held.append(await _tcp(edge.port))
    await poll(both_admitted)
    e = edge.fake()
    welcome = await e.hello(enrolled["token"], enrolled["client_id"])
    assert welcome["type"] == "welcome"
    assert not e.closed.is_set()
    assert await _until_closed(held[1][0]) < 1.0
    assert refused == ["evicted", "evicted"]
    assert edge.gateway.preauth.open == 1  # the newest silent one still waits
    for _, w in held:
        w.close()

    async def all_released() -> bool:
        return edge.gateway.preauth.open == 0

    await poll(all_released)
    e, _ = await edge.connect("edge-01")  # a real client gets in once the flood is gone
    assert not e.closed.is_set()


async def test_over_the_per_source_limit_connections_are_parked_then_reset_when_the_lot_is_full(
    make_edge: Any, poll: Any
) -> None:
    refused: list[str] = []
    edge = await make_edge(
        preauth=PreauthLimits(max_connections=50, max_per_source=3, on_refused=refused.append)
    )
    edge.gateway.parking.max_parked = 1
    held = [await _tcp(edge.port) for _ in range(3)]

    async def admitted() -> bool:
        return edge.gateway.preauth.per_source.get("127.0.0.1") == 3

    await poll(admitted)
    parked = await _tcp(edge.port)

    async def one_parked() -> bool:
        return edge.gateway.parking.count == 1

    await poll(one_parked)
    reader, writer = await _tcp(edge.port)  # the lot is full: reset before TLS
    assert await _until_closed(reader) < 1.0
    assert refused == ["max_per_source"]
    held[0][1].close()  # its slot goes to the parked connection, not to a new one

    async def parked_admitted() -> bool:
        return edge.gateway.parking.count == 0 and edge.gateway.preauth.open == 3

    await poll(parked_admitted)
    for _, w in [*held[1:], parked, (reader, writer)]:
        w.close()


def test_parking_is_fifo_per_source_bounded_and_expires() -> None:
    now = [0.0]
    refusals: list[str] = []
    limits = PreauthLimits(max_connections=2, max_per_source=1, on_refused=refusals.append)
    admitted: list[tuple[str | None, Any]] = []
    parking = Parking(
        limits, lambda c, peer, slot: admitted.append((peer, slot)), 10.0, 3, lambda: now[0]
    )
    socks = [socket.socket() for _ in range(5)]
    try:
        a = limits.admit("A")
        assert not isinstance(a, str)
        assert parking.park("A", socks[0], "A:1") and parking.park("A", socks[1], "A:2")
        b = limits.admit("B")  # the global limit (2) is now full
        assert not isinstance(b, str) and limits.full
        assert parking.park("B", socks[2], "B:1")
        assert not parking.park("B", socks[3], "B:2")  # the lot (3) is full
        a.release()  # A's slot goes to A's first parked connection
        assert [p for p, _ in admitted] == ["A:1"] and parking.count == 2
        now[0] = 5.0
        admitted[0][1].release()
        assert [p for p, _ in admitted] == ["A:1", "A:2"]
        now[0] = 11.0
        parking.expire()  # B:1 waited 11 s > 10 s: reset
        assert parking.count == 0 and refusals == ["max_per_source"] and socks[2].fileno() == -1
        # Parked behind B's own slot while the global limit is full (A:2 and B hold
        # it): B's release gives that slot to B:3.
        assert parking.park("B", socks[4], "B:3") and limits.full
        b.release()
        assert [p for p, _ in admitted][-1] == "B:3" and limits.full and parking.count == 0
    finally:
        parking.close()
        for s in socks:
            s.close()


def test_the_parking_lot_is_sized_for_a_fleet_within_the_fd_limit() -> None:
    # A fleet of 10,000 behind one address fits once the process may open enough fds;
    # parked sockets never take more than half of them.
    assert PARK_MAX >= 10_000
    assert park_capacity(1_048_576) == PARK_MAX
    assert park_capacity(20_000) == 10_000
    assert park_capacity(1024) == 512
    assert park_capacity(1) == 1
    assert park_capacity(resource.RLIM_INFINITY) == PARK_MAX


async def test_parked_connections_wait_out_the_handshake_deadline_by_default(
    make_edge: Any, poll: Any
) -> None:
    """A parked connection outlives its source's slot holder's whole handshake
    deadline and is then admitted (before, it was reset at half that deadline)."""
    refused: list[str] = []
    edge = await make_edge(
        handshake_timeout=0.5,
        preauth=PreauthLimits(max_connections=50, max_per_source=1, on_refused=refused.append),
    )
    assert edge.gateway.parking.max_wait == DEFAULT_PARK_SECS == 25.0
    assert edge.gateway.parking.max_parked == park_capacity()
    silent = await _tcp(edge.port)  # admitted, never says anything: cut at 0.5 s

    async def admitted() -> bool:
        return edge.gateway.preauth.open == 1

    await poll(admitted)
    started = time.monotonic()
    parked = await _tcp(edge.port)

    async def one_parked() -> bool:
        return edge.gateway.parking.count == 1

    await poll(one_parked)
    assert await _until_closed(silent[0]) < 2.0

    async def parked_admitted() -> bool:
        return edge.gateway.parking.count == 0 and edge.gateway.preauth.open == 1

    await poll(parked_admitted)
    assert time.monotonic() - started > 0.25  # longer than half the deadline
    assert refused == ["timeout"]  # the silent one; the parked one was not reset
    # Admitted, it has the handshake deadline of its own, like any connection.
    assert await _until_closed(parked[0]) < 2.0
    assert refused == ["timeout", "timeout"]
    silent[1].close()
    parked[1].close()


async def test_one_deadline_covers_the_handshake_and_the_first_frame(make_edge: Any) -> None:
    refused: list[str] = []
    edge = await make_edge(handshake_timeout=1.0, preauth=PreauthLimits(on_refused=refused.append))
    # Silent TCP: no ClientHello at all.
    reader, writer = await _tcp(edge.port)
    took = await _until_closed(reader)
    assert 0.8 < took < 1.8, took
    writer.close()
    # Slow handshake, then no frame: the deadline started at accept, not after TLS.
    sock = socket.create_connection(("127.0.0.1", edge.port))
    started = time.monotonic()
    await asyncio.sleep(0.6)
    reader, writer = await asyncio.open_connection(sock=sock, ssl=_tls(), server_hostname="")
    await _until_closed(reader)
    took = time.monotonic() - started
    assert 0.8 < took < 1.5, took  # separate deadlines would give 1.6 s
    writer.close()
    assert refused == ["timeout", "timeout"]
    assert edge.gateway.preauth.open == 0


def test_audit_budget_is_a_token_bucket_that_reports_what_it_skipped() -> None:
    now = [0.0]
    budget = AuditBudget(burst=3, every_secs=2.0, clock=lambda: now[0])
    assert [budget.take() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] += 2.0  # one token back
    assert budget.take() == 2 and budget.take() is None
    now[0] += 100.0  # never more than the burst
    assert [budget.take() for _ in range(4)] == [1, 0, 0, None]


async def test_bad_credentials_are_counted_and_refused_enrollments_audited_within_budget(
    make_edge: Any,
) -> None:
    refused: list[str] = []
    edge = await make_edge(preauth=PreauthLimits(on_refused=refused.append))
    now = [0.0]
    edge.gateway.audit_budget = AuditBudget(burst=3, every_secs=10.0, clock=lambda: now[0])
    for i in range(6):
        e = edge.fake()
        reply = await e.enroll(f"guess-{i}")
        assert reply["code"] == "enrollment_invalid"
        await e.close()
    now[0] += 10.0
    e = edge.fake()
    assert (await e.enroll("one-more"))["code"] == "enrollment_invalid"
    await e.close()
    e = edge.fake()
    assert (await e.hello("not-a-token", None))["code"] == "unauthenticated"
    await e.close()
    assert refused == ["enrollment_invalid"] * 7 + ["unauthenticated"]
    entries = (await edge.call("audit.list", {"limit": 100}))["entries"]
    rows = [x for x in entries if x["action"] == "client.enroll" and x["actor"] == "edge"]
    assert len(rows) == 4  # 3 of the first 6, then the one after the refill
    assert rows[0]["details"].get("unaudited_before") == 3, rows[0]


def test_bind_listens_on_each_address_like_asyncio() -> None:
    from portunus.control.fleet.listener import bind

    for host in ("127.0.0.1", "::1"):
        (sock,) = bind(host, 0)
        try:
            assert sock.getsockname()[0] == host and sock.getsockname()[1] > 0
            assert sock.getblocking() is False
            if sock.family == socket.AF_INET6:  # v6-only, as asyncio.start_server binds
                assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        finally:
            sock.close()


async def test_a_connection_reclaimed_before_its_task_ran_is_closed_unread(
    make_edge: Any, poll: Any
) -> None:
    """A burst of accepts can admit connections before any of their tasks starts:
    they are reclaimable all the same, and one reclaimed ends as soon as it runs."""
    refused: list[str] = []
    edge = await make_edge(
        preauth=PreauthLimits(max_connections=1, max_per_source=10, on_refused=refused.append)
    )
    gateway, limits = edge.gateway, edge.gateway.preauth
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    first = limits.admit("10.0.0.1")
    assert not isinstance(first, str)
    gateway._admitted(ours, "10.0.0.1:1", first)  # its task has not run yet
    second = limits.admit("10.0.0.2")  # no await in between
    assert not isinstance(second, str) and first.evicted
    second.release()
    theirs.setblocking(False)

    async def closed() -> bool:
        try:
            return theirs.recv(1) == b""
        except BlockingIOError:
            return False
        except ConnectionError:
            return True

    await poll(closed)
    assert refused == ["evicted"] and limits.open == 0
    theirs.close()
