"""Owner caps end to end: one envelope per (client, owner) over all of the owner's
rules, across the two shards of a real server, layered with each rule's own caps.

Each test uses its own owner (and rules) on one module-wide server, so the
envelopes do not mix.  Throughput is measured where the bytes land (the origin),
as in test_rate_limit.py, whose measuring helpers are reused.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from portunus.shard.udp_budget import FULL_RECHECK_SECS
from tests.e2e.features.helpers import ServerFactory, ServerProc
from tests.e2e.features.test_rate_limit import (
    BUF,
    MB,
    Samples,
    accepted,
    assert_rate,
    echo_forever,
    metered_sink,
    parallel,
    upload,
)
from tests.e2e.support import (
    Origin,
    PortAllocator,
    connect,
    multiproc_value,
    pipe_fds,
    recv_exact,
    wait_for,
)

CAP = 4 * MB


def make_owner(srv: ServerProc, user: str) -> None:
    """A ``user`` granted every port of every client (once per server)."""
    if any(u["user_id"] == user for u in srv.rpc("users.list")["users"]):
        return
    srv.rpc("users.add", {"user_id": user})
    srv.rpc(
        "grants.add",
        {"user_id": user, "client": "*", "listen_port_start": 1, "listen_port_end": 65535},
    )


class Setup:
    def __init__(
        self, srv: ServerProc, samples: Samples, sink: Origin, echo: Origin, ports: PortAllocator
    ) -> None:
        self.srv, self.samples, self.sink, self.echo, self.ports = srv, samples, sink, echo, ports

    def push(
        self, owner: str, target: Origin, rate_limit: dict[str, int] | None = None
    ) -> tuple[str, int]:
        """A rule of ``owner`` (a user made on first use) on a fresh port; (rule id, port)."""
        make_owner(self.srv, owner)
        port = self.ports.port()
        body: dict[str, Any] = {
            "listen_port": port,
            "targets": [{"host": "127.0.0.1", "port": target.port}],
            "owner": owner,
        }
        if rate_limit:
            body["rate_limit"] = rate_limit
        status, rule = self.srv.http("POST", "/v1/rules", body)
        assert status == 201 and rule["owner"] == owner, rule
        return str(rule["id"]), port

    def set_cap(self, owner: str, caps: dict[str, int]) -> None:
        status, body = self.srv.http("PUT", f"/v1/clients/local/owners/{owner}/rate-limit", caps)
        assert status == 200 and body["rate_limit"] == caps, body

    def shard_counts(self, name: str, **labels: str) -> dict[int, float]:
        """``name`` per shard pid, from each shard's own multiprocess file."""
        out = {}
        for pid in (p.pid for p in self.srv.shards().values()):
            db = self.srv.runtime_dir / "metrics" / f"counter_{pid}.db"
            out[pid] = multiproc_value(db, name, **labels) if db.exists() else 0.0
        return out

    def open_on_shard(self, rule: str, port: int) -> tuple[socket.socket, int]:
        """One admitted connection and the pid of the shard that took it."""
        before = self.shard_counts("portunus_rule_connections_total", rule=rule)
        s = connect(port, timeout=30)
        try:

            def landed() -> int | None:
                now = self.shard_counts("portunus_rule_connections_total", rule=rule)
                return next((pid for pid, n in now.items() if n > before.get(pid, 0)), None)

            return s, wait_for(landed, 5, what="the connection to be counted")
        except BaseException:
            s.close()
            raise

    def clear(self) -> None:
        with self.samples.lock:
            self.samples.points.clear()


@pytest.fixture(scope="module")
def setup(server_module: ServerFactory, ports: PortAllocator) -> Iterator[Setup]:
    samples = Samples()
    sink, echo = Origin(metered_sink(samples)), Origin(echo_forever)
    srv = server_module(shards=2)
    try:
        yield Setup(srv, samples, sink, echo, ports)
    finally:
        sink.close()
        echo.close()


@pytest.fixture
def fresh(setup: Setup) -> Setup:
    setup.clear()
    return setup


def reset(s: socket.socket) -> None:
    """Abort: what is still buffered must not flow on into the next measurement."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


# ------------------------------------------------------------------ bandwidth


def test_two_rules_on_two_shards_share_the_owner_cap(fresh: Setup) -> None:
    """The contract's figure: the owner's rules together within ±2 % of the cap over
    10 s, one rule served by each shard.  Rule B has a looser cap of its own
    (the owner's envelope is the tighter one there)."""
    a, port_a = fresh.push("alice", fresh.sink)
    b, port_b = fresh.push("alice", fresh.sink, {"bandwidth_in_bps": 2 * CAP})
    fresh.set_cap("alice", {"bandwidth_in_bps": CAP})
    socks: list[socket.socket] = []
    try:
        s, shard_a = fresh.open_on_shard(a, port_a)
        socks.append(s)
        for _ in range(
            64
        ):  # the kernel picks the shard by source port: retry until B is on the other
            s, shard_b = fresh.open_on_shard(b, port_b)
            if shard_b != shard_a:
                socks.append(s)
                break
            s.close()
        else:
            raise AssertionError("64 connections to rule B all landed on rule A's shard")
        socks += [fresh.open_on_shard(a, port_a)[0], fresh.open_on_shard(b, port_b)[0]]
        per_conn = 10 * CAP // len(socks)
        parallel([lambda s=s: upload(s, per_conn) for s in socks], timeout=60)
    finally:
        for s in socks:
            s.close()
    assert fresh.samples.total == per_conn * len(socks)
    assert_rate("alice: 2 rules x 2 connections over 2 shards for 10 s", fresh.samples, CAP)
    _, whole, _ = fresh.samples.rates()
    assert abs(whole / CAP - 1) <= 0.02 + (CAP / 20) / (CAP * 10)  # the burst is 1/20 s of rate


def test_the_tighter_cap_wins(fresh: Setup) -> None:
    """A rule capped below the owner's envelope runs at its own cap."""
    rule, port = fresh.push("bella", fresh.sink, {"bandwidth_in_bps": 1 * MB})
    fresh.set_cap("bella", {"bandwidth_in_bps": CAP})
    with connect(port, timeout=30) as s:
        upload(s, int(1.5 * MB))
    assert_rate("bella: own 1 MB/s under a 4 MB/s owner cap", fresh.samples, 1 * MB, tolerance=0.03)


def _open_upload(
    port: int, samples: Samples
) -> tuple[socket.socket, threading.Event, threading.Thread]:
    s = connect(port, timeout=30)
    stop = threading.Event()

    def push() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                s.sendall(BUF[:65536])

    t = threading.Thread(target=push, daemon=True)
    t.start()
    wait_for(lambda: samples.total > 0, 5, what="the open upload to flow")
    return s, stop, t


def _steady_rate(setup: Setup, secs: float = 1.5) -> float:
    time.sleep(0.3)  # the change reaches the shards; the old pace leaves the socket buffers
    setup.clear()
    time.sleep(secs)
    return setup.samples.rates(skip=0.2)[0]


def test_hot_update_reaches_an_open_connection(fresh: Setup) -> None:
    """Tightened, lifted and set again while one upload stays open (an uncapped rule:
    paced only by the owner's envelope)."""
    _rule, port = fresh.push("cleo", fresh.sink)
    fresh.set_cap("cleo", {"bandwidth_in_bps": CAP})
    s, stop, t = _open_upload(port, fresh.samples)
    try:
        assert abs(_steady_rate(fresh) / CAP - 1) <= 0.03
        fresh.set_cap("cleo", {"bandwidth_in_bps": 2 * MB})
        rate = _steady_rate(fresh)
        print(f"open connection after PUT 2 MB/s: {rate / MB:.3f} MB/s")
        assert abs(rate / (2 * MB) - 1) <= 0.03
        status, _ = fresh.srv.http("DELETE", "/v1/clients/local/owners/cleo/rate-limit")
        assert status == 204
        rate = _steady_rate(fresh, 1.0)
        print(f"open connection after DELETE: {rate / MB:.1f} MB/s")
        assert rate > 5 * CAP, "the lifted owner cap still paces the open connection"
        fresh.set_cap("cleo", {"bandwidth_in_bps": 3 * MB})
        rate = _steady_rate(fresh)
        assert abs(rate / (3 * MB) - 1) <= 0.03, f"set again: {rate / MB:.3f} MB/s"
    finally:
        stop.set()
        reset(s)
        t.join(10)


def test_owner_cap_added_over_an_open_paced_connection(fresh: Setup) -> None:
    """A rule with a cap of its own is paced through its owner's envelope even while
    the owner has no cap: an owner cap set later reaches its open connections."""
    _rule, port = fresh.push("dora", fresh.sink, {"bandwidth_in_bps": 3 * MB})
    s, stop, t = _open_upload(port, fresh.samples)
    try:
        assert abs(_steady_rate(fresh) / (3 * MB) - 1) <= 0.03
        fresh.set_cap("dora", {"bandwidth_in_bps": 1 * MB})
        rate = _steady_rate(fresh)
        print(f"open connection after the owner cap: {rate / MB:.3f} MB/s")
        assert abs(rate / (1 * MB) - 1) <= 0.03
    finally:
        stop.set()
        reset(s)
        t.join(10)


def test_owner_cap_set_over_an_open_spliced_connection(fresh: Setup) -> None:
    """An uncapped rule relays with splice; its owner's first bandwidth cap switches
    the open relay to paced copying at once (the other direction keeps splice)."""
    _rule, port = fresh.push("gina", fresh.sink)
    s, stop, t = _open_upload(port, fresh.samples)
    try:
        rate = _steady_rate(fresh, 1.0)
        print(f"open spliced connection: {rate / MB:.1f} MB/s")
        assert rate > 5 * CAP
        fresh.set_cap("gina", {"bandwidth_in_bps": 2 * MB})
        rate = _steady_rate(fresh)
        print(f"open connection after the first owner cap: {rate / MB:.3f} MB/s")
        assert abs(rate / (2 * MB) - 1) <= 0.03
    finally:
        stop.set()
        reset(s)
        t.join(10)


def test_a_repaced_relay_still_carries_both_ways(setup: Setup) -> None:
    _rule, port = setup.push("hedy", setup.echo)
    with connect(port, timeout=10) as s:
        s.sendall(b"before")
        assert recv_exact(s, 6) == b"before"
        setup.set_cap("hedy", {"bandwidth_out_bps": 1 * MB})
        time.sleep(0.3)
        payload = bytes(range(256)) * 2048  # 512 KiB each way, paced back at 1 MB/s
        t = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
        started = time.monotonic()
        t.start()
        assert recv_exact(s, len(payload)) == payload
        secs = time.monotonic() - started
        t.join(5)
    print(f"512 KiB echoed back in {secs:.2f} s under a 1 MB/s owner cap")
    assert secs >= 0.4, "the echo back was not paced"


# ------------------------------------------------------------------ connections


def _attempt(port: int, held: list[socket.socket], lock: threading.Lock) -> Callable[[], bool]:
    def run() -> bool:
        s = connect(port, timeout=10)
        try:
            s.sendall(b"x")
            ok = s.recv(1) == b"x"
        except (ConnectionResetError, BrokenPipeError):
            ok = False
        if ok:
            with lock:
                held.append(s)  # kept open until every attempt is done
        else:
            s.close()
        return ok

    return run


def _gated(
    attempt: Callable[[], bool],
    barrier: threading.Barrier,
    results: list[bool],
    lock: threading.Lock,
) -> Callable[[], None]:
    """An attempt that starts when every other one is ready (maximum contention)."""

    def run() -> None:
        barrier.wait(10)
        ok = attempt()
        with lock:
            results.append(ok)

    return run


def test_concurrent_cap_is_never_exceeded(setup: Setup) -> None:
    """4 x N parallel attempts over two rules of one owner, three rounds: exactly N
    get in each time, on whichever shard they land, and the rest are refused at
    once and counted."""
    n, rounds = 4, 3
    rules = [setup.push("edna", setup.echo), setup.push("edna", setup.echo)]
    setup.set_cap("edna", {"concurrent_connections": n})

    def scraped(name: str, **labels: str) -> float:
        metrics = setup.srv.scrape()
        return sum(metrics.value(name, rule=r, **labels) for r, _ in rules)

    held: list[socket.socket] = []
    lock = threading.Lock()
    try:
        for _ in range(rounds):
            refused_before = scraped("portunus_rate_limit_refused_total", limit="owner_concurrent")
            results: list[bool] = []
            barrier = threading.Barrier(4 * n)

            parallel(
                [
                    _gated(_attempt(rules[i % 2][1], held, lock), barrier, results, lock)
                    for i in range(4 * n)
                ],
                timeout=30,
            )
            assert len(results) == 4 * n
            assert sum(results) == n, (
                f"{sum(results)} of {4 * n} connections admitted under a cap of {n}"
            )
            assert scraped("portunus_rule_active_connections") == n
            refused = scraped("portunus_rate_limit_refused_total", limit="owner_concurrent")
            assert refused - refused_before == 3 * n
            for s in held:
                s.close()
            held.clear()
            wait_for(
                lambda: scraped("portunus_rule_active_connections") == 0,
                5,
                what="every connection closed",
            )
            # A shard that refused one keeps refusing for FULL_RECHECK_SECS without reading
            # the shared count (flood protection; only its own releases cut that short).
            time.sleep(FULL_RECHECK_SECS + 0.1)
        # Both shards took attempts (admitted or refused): the count is the node's, not a shard's.
        seen = {
            pid
            for r, _ in rules
            for name, labels in (
                ("portunus_rule_connections_total", {}),
                ("portunus_rate_limit_refused_total", {"limit": "owner_concurrent"}),
            )
            for pid, v in setup.shard_counts(name, rule=r, **labels).items()
            if v
        }
        assert len(seen) == 2, "every attempt landed on one shard"
        # One slot frees when one connection closes, for either rule.
        for i in range(n):
            assert _attempt(rules[i % 2][1], held, lock)()
        assert not accepted(rules[0][1])
        held.pop().close()
        wait_for(
            lambda: accepted(rules[1][1]) or accepted(rules[0][1]),
            5,
            interval=0.05,
            what="a slot after one connection closed",
        )
    finally:
        for s in held:
            s.close()


def test_a_connection_cap_counts_the_connections_already_open(setup: Setup) -> None:
    """Set while 3 connections are open (on both rules), a cap of 2 refuses new ones
    until two of them have closed."""
    rules = [setup.push("jade", setup.echo), setup.push("jade", setup.echo)]
    held: list[socket.socket] = []
    lock = threading.Lock()
    try:
        for i in range(3):
            assert _attempt(rules[i % 2][1], held, lock)()
        setup.set_cap("jade", {"concurrent_connections": 2})
        time.sleep(0.3)  # the change reaches both shards
        assert not accepted(rules[0][1]) and not accepted(rules[1][1])
        for s in held:  # the open ones are unaffected
            s.sendall(b"y")
            assert recv_exact(s, 1) == b"y"
        held.pop().close()
        time.sleep(0.3)
        assert not accepted(rules[1][1]), "admitted with 2 open under a cap of 2"
        held.pop().close()
        wait_for(
            lambda: _attempt(rules[1][1], held, lock)(),
            5,
            interval=0.05,
            what="a slot once only one connection is open",
        )
        assert not accepted(rules[0][1])
    finally:
        for s in held:
            s.close()


def test_owner_new_connections_per_sec(setup: Setup) -> None:
    """5/s over two rules of one owner (burst 5): about 5 + 5/s get in, counted by limit."""
    rules = [setup.push("fern", setup.echo), setup.push("fern", setup.echo)]
    setup.set_cap("fern", {"new_connections_per_sec": 5})
    results: list[bool] = []
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < 2.0:
        results.append(accepted(rules[i % 2][1]))
        i += 1
        time.sleep(0.04)
    elapsed = time.monotonic() - started
    ok, expected = sum(results), 5 + 5 * elapsed
    print(
        f"owner new connections: {ok} of {len(results)} in {elapsed:.2f} s, expected ~{expected:.1f}"
    )
    assert results[:5] == [True] * 5
    assert expected - 2 <= ok <= expected + 1
    refused = sum(
        setup.srv.scrape().value(
            "portunus_rate_limit_refused_total", rule=r, limit="owner_new_connections"
        )
        for r, _ in rules
    )
    assert refused == len(results) - ok


def test_connection_caps_keep_splice_and_other_owners_are_untouched(
    server: ServerFactory, origin: Callable[..., Origin], ports: PortAllocator
) -> None:
    """An owned rule under a connection-only owner cap keeps the zero-copy path
    (the shard opens its pipes) and runs far above any bandwidth cap; another
    owner's bandwidth cap does not touch it.  A fresh server: no pooled pipes yet."""
    setup = Setup(server(), Samples(), origin(metered_sink(Samples())), origin(echo_forever), ports)
    _rule, port = setup.push("gwen", setup.sink)
    setup.set_cap("gwen", {"concurrent_connections": 5})
    make_owner(setup.srv, "hana")
    setup.set_cap("hana", {"bandwidth_in_bps": 1 * MB})
    shard = setup.srv.shards()[0].pid
    baseline = pipe_fds(shard)
    started = time.monotonic()
    with connect(port, timeout=30) as s:
        upload(s, 20 * CAP)
    rate = 20 * CAP / (time.monotonic() - started)
    assert rate > 5 * CAP, f"gwen's rule ran at {rate / MB:.1f} MB/s"
    assert pipe_fds(shard) > baseline, "the owned rule did not splice"


# ------------------------------------------------------------------ operator surface


def test_cli_and_http_surface(setup: Setup) -> None:
    srv = setup.srv
    make_owner(srv, "iris")
    rule = srv.cli_json(
        "push-rule", "local", str(setup.ports.port()), setup.echo.address, "--owner", "iris"
    )
    assert rule["owner"] == "iris"
    assert srv.cli("owner-cap", "set", "local", "iris").code == 3  # no caps: pre-flight
    assert srv.cli("owner-cap", "set", "local", "Iris!", "--concurrent-connections", "2").code == 2
    assert srv.cli("owner-cap", "get", "local", "iris").code == 5
    assert srv.cli("owner-cap", "list", "no-such-client").code == 5
    assert srv.cli("owner-cap", "delete", "local", "iris").code == 5
    got = srv.cli_json(
        "owner-cap",
        "set",
        "local",
        "iris",
        "--bandwidth-out-bps",
        "2000000",
        "--bandwidth-out-bps-burst",
        "200000",
    )
    assert got["rate_limit"] == {"bandwidth_out_bps": 2000000, "bandwidth_out_bps_burst": 200000}
    assert srv.cli_json("owner-cap", "get", "local", "iris") == got
    listing = srv.cli_json("owner-cap", "list", "local")
    assert {
        "owner": "iris",
        "rule_count": 1,
        "rate_limit": got["rate_limit"],
        "updated_at": got["updated_at"],
    } in listing["owners"]
    status, body = srv.http("GET", "/v1/clients/local/owners")
    assert status == 200 and body == listing
    status, body = srv.http("PUT", "/v1/clients/local/owners/iris/rate-limit", {})
    assert status == 400 and body["error"]["code"] == "preflight"
    status, body = srv.http(
        "PUT", "/v1/clients/local/owners/iris/rate-limit", {"bandwidth_out_bps": -1}
    )
    assert status == 400 and body["error"]["code"] == "validation.rate_limit"
    text = srv.cli("owner-cap", "delete", "local", "iris")
    assert text.code == 0 and "lifted" in text.out
    status, _ = srv.http("DELETE", "/v1/clients/local/owners/iris/rate-limit")
    assert status == 404
    actions = [
        (e["action"], e["outcome"], e["error_code"])
        for e in srv.cli_json("audit")["entries"]
        if e["target"] == "client:local/owner:iris"
    ]
    assert ("owner_cap.set", "ok", None) in actions and ("owner_cap.delete", "ok", None) in actions
    assert ("owner_cap.set", "error", "preflight") in actions
    assert ("owner_cap.delete", "error", "owner_cap_not_found") in actions
    doc = srv.http("GET", "/v1/openapi.json", token=None)[1]
    assert {"get", "put", "delete"} <= set(
        doc["paths"]["/v1/clients/{id}/owners/{owner}/rate-limit"]
    )


def test_caps_survive_a_shard_respawn_and_a_control_restart(
    server: ServerFactory, origin: Callable[..., Origin], ports: PortAllocator
) -> None:
    """The supervisor hands a respawned shard the owner caps before its rules; a new
    control process sends the stored caps again and takes changes."""
    setup = Setup(server(), Samples(), origin(metered_sink(Samples())), origin(echo_forever), ports)
    srv = setup.srv
    _rule, port = setup.push("kira", setup.echo)
    setup.set_cap("kira", {"concurrent_connections": 1})
    held: list[socket.socket] = []
    lock = threading.Lock()

    def exactly(n: int) -> None:
        for _ in range(n):
            assert wait_for(
                lambda: _attempt(port, held, lock)(), 5, interval=0.05, what="a connection admitted"
            )
        time.sleep(FULL_RECHECK_SECS + 0.1)
        assert not accepted(port), f"more than {n} connection(s) admitted"
        for s in held:
            s.close()
        held.clear()

    try:
        exactly(1)
        victim = srv.shards()[0]
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(
            lambda: (s := srv.shards().get(0)) is not None and s.pid != victim.pid,
            10,
            what="shard 0 respawned",
        )
        exactly(1)
        control = srv.child("control")
        assert control is not None
        os.kill(control.pid, signal.SIGKILL)
        wait_for(
            lambda: (c := srv.child("control")) is not None and c.pid != control.pid,
            10,
            what="a new control process",
        )
        wait_for(srv.health_ok, 10, what="/v1/health after the control restart")
        exactly(1)
        setup.set_cap("kira", {"concurrent_connections": 2})
        exactly(2)
    finally:
        for s in held:
            s.close()
