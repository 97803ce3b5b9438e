"""portunus.shard.dns against a scripted DNS server on 127.0.0.1 (UDP + TCP)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import uvloop

from portunus.shard import dns_wire as wire
from portunus.shard.dns import ResolveError, Resolver

QTYPES = {1: "A", 28: "AAAA", 5: "CNAME"}
RTYPES = {v: k for k, v in QTYPES.items()}


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


class FakeDNS(asyncio.DatagramProtocol):
    """A scripted recursive server: zone maps a name to [(type, data, ttl)].

    ``mode`` is "answer", "silent" or "servfail"; names in ``truncate`` get a TC
    reply over UDP and the full answer over TCP; ``delay`` holds every reply.
    """

    def __init__(self) -> None:
        self.zone: dict[str, list[tuple[str, str, int]]] = {}
        self.mode = "answer"
        self.truncate: set[str] = set()
        self.delay = 0.0
        self.udp = Counter[tuple[str, str]]()
        self.tcp = Counter[tuple[str, str]]()
        self.transport: asyncio.DatagramTransport | None = None
        self.tcp_server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def addr(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        name, qtype = self.question(data)
        self.udp[(name, QTYPES.get(qtype, str(qtype)))] += 1
        if self.mode == "silent":
            return
        reply = self.reply(data, tc=name in self.truncate)
        task = asyncio.ensure_future(self.send_later(reply, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def send_later(self, reply: bytes, addr: tuple[str, int]) -> None:
        await asyncio.sleep(self.delay)
        assert self.transport is not None
        self.transport.sendto(reply, addr)

    async def handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length = int.from_bytes(await reader.readexactly(2), "big")
        query = await reader.readexactly(length)
        name, qtype = self.question(query)
        self.tcp[(name, QTYPES.get(qtype, str(qtype)))] += 1
        reply = self.reply(query, tc=False)
        writer.write(len(reply).to_bytes(2, "big") + reply)
        await writer.drain()
        writer.close()

    @staticmethod
    def question(query: bytes) -> tuple[str, int]:
        off, labels = 12, []
        while query[off]:
            labels.append(query[off + 1 : off + 1 + query[off]].decode())
            off += 1 + query[off]
        return ".".join(labels).lower(), struct.unpack_from("!H", query, off + 1)[0]

    def reply(self, query: bytes, tc: bool) -> bytes:
        name, qtype = self.question(query)
        qend = 12 + len(encode_name(name)) + 4
        rcode, answers = 0, b""
        count = 0
        if self.mode == "servfail":
            rcode = 2
        elif name not in self.zone:
            rcode = 3
        elif not tc:
            current, seen = name, set()
            while current in self.zone and current not in seen:
                seen.add(current)
                nxt = None
                for rtype, data, ttl in self.zone[current]:
                    if rtype == "CNAME":
                        rdata = encode_name(data)
                        nxt = data
                    elif RTYPES[rtype] == qtype:
                        rdata = socket.inet_pton(
                            socket.AF_INET if rtype == "A" else socket.AF_INET6, data
                        )
                    else:
                        continue
                    # the first owner is written as a pointer to the question
                    owner = b"\xc0\x0c" if current == name else encode_name(current)
                    answers += owner + struct.pack("!HHIH", RTYPES[rtype], 1, ttl, len(rdata))
                    answers += rdata
                    count += 1
                if nxt is None:
                    break
                current = nxt
        flags = 0x8180 | rcode | (0x0200 if tc else 0)
        return query[:2] + struct.pack("!5H", flags, 1, count, 0, 0) + query[12:qend] + answers

    def queries(self, name: str) -> int:
        return sum(n for (qname, _), n in self.udp.items() if qname == name)


async def start_fake_dns() -> FakeDNS:
    loop = asyncio.get_running_loop()
    server = FakeDNS()
    for _ in range(20):  # TCP must get the same port number as UDP
        transport, _ = await loop.create_datagram_endpoint(
            lambda: server, local_addr=("127.0.0.1", 0)
        )
        try:
            server.tcp_server = await asyncio.start_server(
                server.handle_tcp, "127.0.0.1", server.addr[1]
            )
            return server
        except OSError:
            transport.close()
    raise RuntimeError("no port free for both UDP and TCP")


async def stop_fake_dns(server: FakeDNS) -> None:
    if server.transport is not None:
        server.transport.close()
    if server.tcp_server is not None:
        server.tcp_server.close()
        await server.tcp_server.wait_closed()
    for task in list(server.tasks):
        task.cancel()


@pytest.fixture
async def fake_dns() -> AsyncIterator[FakeDNS]:
    server = await start_fake_dns()
    yield server
    await stop_fake_dns(server)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("")
    return path


@pytest.fixture
def make_resolver(
    fake_dns: FakeDNS, clock: Clock, hosts_file: Path, tmp_path: Path
) -> Callable[..., Resolver]:
    empty_resolv = tmp_path / "resolv.conf"
    empty_resolv.write_text("")

    def make(**kw: object) -> Resolver:
        kw.setdefault("nameservers", [fake_dns.addr])
        kw.setdefault("timeout", 0.3)
        return Resolver(
            hosts_path=str(hosts_file), resolv_conf=str(empty_resolv), clock=clock, **kw
        )  # type: ignore[arg-type]

    return make


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_literal_is_returned_without_io(make_resolver, fake_dns) -> None:
    r = make_resolver()
    assert await r.resolve("10.1.2.3") == ["10.1.2.3"]
    assert await r.resolve("::1") == ["::1"]
    assert await r.resolve("[2001:db8::1]") == ["2001:db8::1"]
    assert sum(fake_dns.udp.values()) == 0 and r.lookups == 0


async def test_ipv4_first_unless_prefer_ipv6_and_deduplicated(make_resolver, fake_dns) -> None:
    fake_dns.zone["both.test"] = [
        ("AAAA", "2001:db8::5", 60),
        ("A", "192.0.2.5", 60),
        ("A", "192.0.2.6", 60),
        ("A", "192.0.2.5", 60),
    ]
    r = make_resolver()
    assert await r.resolve("both.test") == ["192.0.2.5", "192.0.2.6", "2001:db8::5"]
    assert await r.resolve("Both.Test.", prefer_ipv6=True) == [
        "2001:db8::5",
        "192.0.2.5",
        "192.0.2.6",
    ]
    assert fake_dns.udp == {("both.test", "A"): 1, ("both.test", "AAAA"): 1}


async def test_low_ttl_is_clamped_up_to_min(make_resolver, fake_dns, clock) -> None:
    fake_dns.zone["low.test"] = [("A", "192.0.2.1", 1)]
    r = make_resolver()
    await r.resolve("low.test")
    clock.now += 4.4  # past the record's TTL of 1 s, before the clamped 5 s
    await r.resolve("low.test")
    assert fake_dns.queries("low.test") == 2
    clock.now += 0.7
    assert await r.resolve("low.test") == ["192.0.2.1"]
    assert fake_dns.queries("low.test") == 4


async def test_high_ttl_is_clamped_down_to_max(make_resolver, fake_dns, clock) -> None:
    fake_dns.zone["high.test"] = [("A", "192.0.2.1", 86400)]
    r = make_resolver()
    await r.resolve("high.test")
    clock.now += 269
    await r.resolve("high.test")
    assert fake_dns.queries("high.test") == 2
    clock.now += 32  # 301 s after the answer
    await r.resolve("high.test")
    assert fake_dns.queries("high.test") == 4


async def test_refresh_ahead_does_not_make_the_caller_wait(make_resolver, fake_dns, clock) -> None:
    fake_dns.zone["soon.test"] = [("A", "192.0.2.1", 100)]
    r = make_resolver(timeout=2.0)
    await r.resolve("soon.test")
    fake_dns.zone["soon.test"] = [("A", "192.0.2.2", 100)]
    fake_dns.delay = 0.5
    clock.now += 95  # inside the last tenth of the TTL
    started = time.monotonic()
    assert await r.resolve("soon.test") == ["192.0.2.1"]
    assert time.monotonic() - started < 0.3
    await wait_for(lambda: not r._inflight)
    assert await r.resolve("soon.test") == ["192.0.2.2"]
    assert fake_dns.queries("soon.test") == 4


async def test_stale_answer_served_for_30s_after_expiry_then_error(
    make_resolver, fake_dns, clock
) -> None:
    fake_dns.zone["stale.test"] = [("A", "192.0.2.7", 10)]
    r = make_resolver(timeout=0.1)
    await r.resolve("stale.test")
    fake_dns.mode = "silent"
    clock.now += 11
    assert await r.resolve("stale.test") == ["192.0.2.7"]
    assert r.stale_served == 1 and r.failures == 1
    asked = fake_dns.queries("stale.test")
    clock.now += 1  # within the retry pause: served at once, no query
    assert await r.resolve("stale.test") == ["192.0.2.7"]
    assert fake_dns.queries("stale.test") == asked
    clock.now += 27  # 39 s: expired 29 s ago, retried, still stale
    assert await r.resolve("stale.test") == ["192.0.2.7"]
    assert fake_dns.queries("stale.test") > asked
    assert r.stale_served == 3
    clock.now += 2  # 41 s: more than 30 s past expiry
    with pytest.raises(ResolveError):
        await r.resolve("stale.test")
    assert r.rejected == 1


async def test_servfail_after_expiry_serves_stale_but_nxdomain_does_not(
    make_resolver, fake_dns, clock
) -> None:
    fake_dns.zone["gone.test"] = [("A", "192.0.2.8", 10)]
    r = make_resolver()
    await r.resolve("gone.test")
    fake_dns.mode = "servfail"
    clock.now += 11
    assert await r.resolve("gone.test") == ["192.0.2.8"]
    fake_dns.mode = "answer"
    del fake_dns.zone["gone.test"]
    clock.now += 6
    with pytest.raises(ResolveError, match="NXDOMAIN"):
        await r.resolve("gone.test")


async def test_concurrent_lookups_share_one_query_per_type(make_resolver, fake_dns) -> None:
    fake_dns.zone["busy.test"] = [("A", "192.0.2.9", 60), ("AAAA", "2001:db8::9", 60)]
    fake_dns.delay = 0.05
    r = make_resolver()
    results = await asyncio.gather(*(r.resolve("busy.test") for _ in range(10)))
    assert all(res == ["192.0.2.9", "2001:db8::9"] for res in results)
    assert fake_dns.udp == {("busy.test", "A"): 1, ("busy.test", "AAAA"): 1}
    assert r.lookups == 1 and r.queries == 2


async def test_cancelled_caller_does_not_cancel_the_shared_lookup(make_resolver, fake_dns) -> None:
    fake_dns.zone["c.test"] = [("A", "192.0.2.3", 60)]
    fake_dns.delay = 0.1
    r = make_resolver()
    first = asyncio.ensure_future(r.resolve("c.test"))
    second = asyncio.ensure_future(r.resolve("c.test"))
    await asyncio.sleep(0.02)
    first.cancel()
    assert await second == ["192.0.2.3"]
    assert r.lookups == 1


async def test_cname_chain_is_followed_with_minimum_ttl(make_resolver, fake_dns, clock) -> None:
    fake_dns.zone["www.test"] = [("CNAME", "edge.test", 20)]
    fake_dns.zone["edge.test"] = [("CNAME", "host.test", 200)]
    fake_dns.zone["host.test"] = [("A", "192.0.2.10", 100), ("AAAA", "2001:db8::10", 100)]
    r = make_resolver()
    assert await r.resolve("www.test") == ["192.0.2.10", "2001:db8::10"]
    clock.now += 17
    await r.resolve("www.test")
    assert fake_dns.queries("www.test") == 2
    clock.now += 4
    await r.resolve("www.test")
    assert fake_dns.queries("www.test") == 4


async def test_truncated_answer_is_retried_over_tcp(make_resolver, fake_dns) -> None:
    fake_dns.zone["big.test"] = [("A", "192.0.2.11", 60), ("A", "192.0.2.12", 60)]
    fake_dns.truncate.add("big.test")
    r = make_resolver()
    assert await r.resolve("big.test") == ["192.0.2.11", "192.0.2.12"]
    assert fake_dns.tcp == {("big.test", "A"): 1, ("big.test", "AAAA"): 1}
    assert r.tcp_queries == 2


async def test_next_nameserver_is_tried_after_timeout_and_servfail(make_resolver, fake_dns) -> None:
    fake_dns.zone["ok.test"] = [("A", "192.0.2.13", 60)]
    silent = await start_fake_dns()
    broken = await start_fake_dns()
    try:
        silent.mode, broken.mode = "silent", "servfail"
        r = make_resolver(nameservers=[silent.addr, broken.addr, fake_dns.addr], timeout=0.1)
        assert await r.resolve("ok.test") == ["192.0.2.13"]
        assert silent.queries("ok.test") == 2 and broken.queries("ok.test") == 2
    finally:
        await stop_fake_dns(silent)
        await stop_fake_dns(broken)


async def test_timeout_raises_fast_and_negative_entry_fails_next_call_at_once(
    make_resolver, fake_dns
) -> None:
    fake_dns.mode = "silent"
    other = await start_fake_dns()
    try:
        other.mode = "silent"
        r = make_resolver(nameservers=[fake_dns.addr, other.addr], timeout=0.2)
        started = time.monotonic()
        with pytest.raises(ResolveError, match="timeout"):
            await r.resolve("down.test")
        elapsed = time.monotonic() - started
        assert 0.35 < elapsed < 1.0  # 2 servers × 0.2 s, A and AAAA in parallel
        asked = fake_dns.queries("down.test")
        started = time.monotonic()
        with pytest.raises(ResolveError):
            await r.resolve("down.test")
        assert time.monotonic() - started < 0.15
        assert fake_dns.queries("down.test") == asked
        assert r.failures == 1 and r.rejected == 2
    finally:
        await stop_fake_dns(other)


async def test_refused_port_fails_without_waiting_for_timeout(make_resolver) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: ICMP port unreachable
    r = make_resolver(nameservers=[("127.0.0.1", port)], timeout=2.0)
    started = time.monotonic()
    with pytest.raises(ResolveError):
        await r.resolve("nobody.test")
    assert time.monotonic() - started < 1.0


async def test_hosts_file_answers_and_is_reread_when_changed(
    make_resolver, fake_dns, hosts_file, clock
) -> None:
    hosts_file.write_text("# comment\n10.9.9.9  myhost.test alias.test\n2001:db8::99 myhost.test\n")
    r = make_resolver()
    assert await r.resolve("myhost.test") == ["10.9.9.9", "2001:db8::99"]
    assert await r.resolve("ALIAS.test") == ["10.9.9.9"]
    assert sum(fake_dns.udp.values()) == 0 and r.hosts_hits == 2
    hosts_file.write_text("10.8.8.8 myhost.test\n")
    st = hosts_file.stat()
    os.utime(hosts_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert await r.resolve("myhost.test") == ["10.9.9.9", "2001:db8::99"]  # cached
    clock.now += 5.1  # hosts answers live min_ttl
    assert await r.resolve("myhost.test") == ["10.8.8.8"]
    assert sum(fake_dns.udp.values()) == 0


async def test_getaddrinfo_fallback_without_nameservers(hosts_file, tmp_path, clock) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# no nameserver line\n")
    # The system hosts file names localhost, so glibc answers without any network.
    r = Resolver(hosts_path=str(hosts_file), resolv_conf=str(resolv), clock=clock)
    assert "127.0.0.1" in await r.resolve("localhost")
    assert r.getaddrinfo_calls == 1 and r.queries == 0
    clock.now += 29
    await r.resolve("localhost")
    assert r.getaddrinfo_calls == 1
    clock.now += 2
    await r.resolve("localhost")
    assert r.getaddrinfo_calls == 2


async def test_invalid_name_is_rejected_without_queries(make_resolver, fake_dns) -> None:
    r = make_resolver()
    with pytest.raises(ResolveError):
        await r.resolve("a" * 64 + ".test")
    with pytest.raises(ResolveError):
        await r.resolve("bad..test")
    assert sum(fake_dns.udp.values()) == 0


def test_resolv_conf_and_hosts_parsing() -> None:
    text = (
        "search example.com\nnameserver 10.0.0.1\nnameserver ::1\nnameserver bogus\n"
        "options ndots:2\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n"
    )
    assert wire.parse_resolv_conf(text) == [("10.0.0.1", 53), ("::1", 53), ("10.0.0.2", 53)]
    hosts = wire.parse_hosts("127.0.0.1 a b # c\n::1 a\nnot-an-ip x\n\n10.0.0.1 A.\n")
    assert hosts == {"a": (("127.0.0.1", "10.0.0.1"), ("::1",)), "b": (("127.0.0.1",), ())}


def test_decoder_rejects_loops_foreign_ids_and_short_packets() -> None:
    query = wire.encode_query(0x1234, "x.test", wire.TYPE_A)
    header = struct.pack("!6H", 0x1234, 0x8180, 0, 1, 0, 0)
    looped = header + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x01\x02\x03\x04"
    with pytest.raises(wire.FormatError):
        wire.decode_answer(looped, 0x1234, "x.test", wire.TYPE_A)
    with pytest.raises(wire.FormatError):
        wire.decode_answer(header[:8], 0x1234, "x.test", wire.TYPE_A)
    with pytest.raises(wire.FormatError):
        wire.decode_answer(query, 0x1234, "x.test", wire.TYPE_A)  # QR bit clear
    reply = bytearray(query)
    reply[2] |= 0x80
    with pytest.raises(wire.FormatError):
        wire.decode_answer(bytes(reply), 0x4321, "x.test", wire.TYPE_A)
    with pytest.raises(wire.FormatError):
        wire.decode_answer(bytes(reply), 0x1234, "y.test", wire.TYPE_A)
    assert wire.decode_answer(bytes(reply), 0x1234, "x.test", wire.TYPE_A)[:3] == (0, False, [])


def test_resolver_works_on_uvloop(tmp_path: Path) -> None:
    """The shard runs uvloop: datagram endpoints, TCP fallback and timeouts there too."""
    hosts = tmp_path / "hosts"
    hosts.write_text("")

    async def scenario() -> None:
        server = await start_fake_dns()
        silent = await start_fake_dns()
        try:
            silent.mode = "silent"
            server.zone["uv.test"] = [("A", "192.0.2.20", 60), ("AAAA", "2001:db8::20", 60)]
            server.zone["tc.test"] = [("A", "192.0.2.21", 60)]
            server.truncate.add("tc.test")
            r = Resolver(nameservers=[silent.addr, server.addr], hosts_path=str(hosts), timeout=0.2)
            assert await r.resolve("uv.test", prefer_ipv6=True) == ["2001:db8::20", "192.0.2.20"]
            assert await r.resolve("tc.test") == ["192.0.2.21"]
            assert server.tcp[("tc.test", "A")] == 1
            with pytest.raises(ResolveError):
                await r.resolve("missing.test")
        finally:
            await stop_fake_dns(server)
            await stop_fake_dns(silent)

    uvloop.run(scenario())
