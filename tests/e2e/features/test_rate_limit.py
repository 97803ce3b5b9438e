"""Per-rule rate limits in the data plane, across two shards.

One standalone with two shards serves several rules (a bandwidth cap both ways,
an unlimited twin, concurrent and new-connection caps, a UDP cap).  Throughput is
measured where the bytes land (the origin for uploads, the client for
downloads), as the slope of bytes over time once the first half second (the
bucket's initial burst, socket buffers filling) is past: that is what "within
±2 % of the cap" is about.  The whole-transfer average is checked too, with the
burst allowed for.  ``PUT /v1/rules/{id}`` is checked through the real server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.features.helpers import ServerFactory, UdpPortEcho
from tests.e2e.support import (
    LOOPBACK,
    ConnRecord,
    Origin,
    PortAllocator,
    StandaloneFactory,
    StandaloneProc,
    connect,
    multiproc_value,
    pipe_fds,
    recv_exact,
    wait_for,
)

MB = 1_000_000
CAP_IN = 4 * MB
CAP_OUT = 3 * MB
UDP_CAP = 500_000
# The cap has to hold to ±2 % (the product's accuracy target); the server test allows 3 % for its
# 1.5 s runs (a control round trip and two shards starting on a 2-core box).
TOLERANCE = 0.02
SKIP_SECS = 0.5
BUF = bytes(256 * 1024)


# ------------------------------------------------------------------ measuring


class Samples:
    """(time, bytes) increments of many connections, merged into one slope."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.points: list[tuple[float, int]] = []

    def add(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.points.append((now, n))

    @property
    def total(self) -> int:
        with self.lock:
            return sum(n for _, n in self.points)

    def rates(self, skip: float = SKIP_SECS) -> tuple[float, float, float]:
        """(steady rate after ``skip`` s, whole-transfer rate, duration)."""
        with self.lock:
            pts = sorted(self.points)
        assert pts, "no bytes arrived"
        t0, t_end = pts[0][0], pts[-1][0]
        total = sum(n for _, n in pts)
        # Bytes of a sample arrived by its time: a span counts those after its start.
        cum = 0
        start_t, start_cum = t0, pts[0][1]
        for t, n in pts:
            cum += n
            if t - t0 >= skip:
                start_t, start_cum = t, cum
                break
        steady = (total - start_cum) / (t_end - start_t) if t_end > start_t else 0.0
        whole = (total - pts[0][1]) / (t_end - t0) if t_end > t0 else 0.0
        return steady, whole, t_end - t0


def metered_sink(samples: Samples) -> Callable[[socket.socket, ConnRecord], None]:
    """Origin handler: read to EOF, recording when bytes arrived (no hashing: cheap)."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        buf = bytearray(256 * 1024)
        while n := conn.recv_into(buf):
            samples.add(n)
            rec.rx.count += n
        conn.shutdown(socket.SHUT_WR)

    return handler


def pusher(nbytes: int) -> Callable[[socket.socket, ConnRecord], None]:
    """Origin handler: send ``nbytes`` at full speed, then close."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        left = nbytes
        while left > 0:
            n = conn.send(BUF[: min(left, len(BUF))])
            left -= n
            rec.tx.count += n
        conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    return handler


def echo_forever(conn: socket.socket, rec: ConnRecord) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def upload(sock: socket.socket, nbytes: int) -> None:
    """Send ``nbytes`` as fast as the relay takes them, half-close, wait for EOF."""
    left = nbytes
    while left > 0:
        left -= sock.send(BUF[: min(left, len(BUF))])
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass


def parallel(jobs: list[Callable[[], None]], timeout: float = 60.0) -> None:
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,), daemon=True) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a transfer hung"
    if errors:
        raise errors[0]


def shard_connections(proc: StandaloneProc, rule: str) -> dict[int, float]:
    """Connections of ``rule`` per shard pid, from each shard's own metrics file."""
    out = {}
    for pid in (p.pid for p in proc.shards().values()):
        db = proc.metrics_dir / f"counter_{pid}.db"
        out[pid] = (
            multiproc_value(db, "portunus_rule_connections_total", rule=rule)
            if db.exists()
            else 0.0
        )
    return out


def open_counted(proc: StandaloneProc, port: int, rule: str) -> tuple[socket.socket, int]:
    """One admitted connection and the pid of the shard that took it."""
    before = shard_connections(proc, rule)
    s = connect(port, timeout=30)
    try:

        def landed() -> int | None:
            now = shard_connections(proc, rule)
            return next((pid for pid, n in now.items() if n > before.get(pid, 0)), None)

        return s, wait_for(landed, 5, what="the connection to be counted")
    except BaseException:
        s.close()
        raise


def spread_connections(proc: StandaloneProc, port: int, rule: str, n: int) -> list[socket.socket]:
    """``n`` open connections to ``port``, at least one on each shard (the kernel
    hashes source ports: with ``n`` on one shard, one of them is swapped until not)."""
    live: list[tuple[socket.socket, int]] = []
    shards = len(proc.shards())
    try:
        for _ in range(64):
            if len(live) == n:
                if len({pid for _, pid in live}) >= min(n, shards):
                    return [s for s, _ in live]
                live.pop()[0].close()
                wait_for(
                    lambda: (
                        proc.scrape().value("portunus_rule_active_connections", rule=rule) == n - 1
                    ),
                    5,
                    what="the swapped connection to close",
                )
            live.append(open_counted(proc, port, rule))
        raise AssertionError("64 connections never reached every shard")
    except BaseException:
        for s, _ in live:
            s.close()
        raise


def assert_rate(what: str, samples: Samples, cap: float, tolerance: float = TOLERANCE) -> None:
    steady, whole, secs = samples.rates()
    print(
        f"{what}: steady {steady / MB:.4f} MB/s ({steady / cap - 1:+.2%}), whole {whole / MB:.4f} MB/s "
        f"({whole / cap - 1:+.2%}) over {secs:.2f} s, cap {cap / MB:.3f} MB/s"
    )
    assert abs(steady / cap - 1) <= tolerance, f"{what}: steady {steady:.0f} B/s vs cap {cap:.0f}"
    # The whole transfer also carries the initial burst (1/20 s of rate) on top.
    burst_share = (cap / 20) / (cap * secs)
    assert -tolerance <= whole / cap - 1 <= tolerance + burst_share + 0.01, (
        f"{what}: whole {whole:.0f} B/s"
    )


# ------------------------------------------------------------------ fixtures


class Setup:
    """The shared standalone (2 shards) and its origins and ports."""

    def __init__(
        self,
        proc: StandaloneProc,
        ports: dict[str, int],
        samples: Samples,
        origins: dict[str, Origin],
        udp_echo: UdpPortEcho,
    ) -> None:
        self.proc = proc
        self.ports = ports
        self.samples = samples
        self.origins = origins
        self.udp_echo = udp_echo


@pytest.fixture(scope="module")
def setup(standalone_module: StandaloneFactory, ports: PortAllocator) -> Iterator[Setup]:
    samples = Samples()
    origins = {
        "sink": Origin(metered_sink(samples)),
        "push": Origin(pusher(2 * CAP_OUT)),
        "echo": Origin(echo_forever),
    }
    udp_echo = UdpPortEcho([ports.port()])
    p = {name: ports.port() for name in ("capped", "free", "out", "conc", "cps", "udp", "udpconc")}
    rules: list[dict[str, Any]] = [
        {
            "name": "capped",
            "listen_port": p["capped"],
            "target": origins["sink"].address,
            "rate_limit": {"bandwidth_in_bps": CAP_IN, "bandwidth_out_bps": CAP_IN},
        },
        {"name": "free", "listen_port": p["free"], "target": origins["sink"].address},
        {
            "name": "out",
            "listen_port": p["out"],
            "target": origins["push"].address,
            "rate_limit": {"bandwidth_out_bps": CAP_OUT},
        },
        {
            "name": "conc",
            "listen_port": p["conc"],
            "target": origins["echo"].address,
            "rate_limit": {"concurrent_connections": 3},
        },
        {
            "name": "cps",
            "listen_port": p["cps"],
            "target": origins["echo"].address,
            "rate_limit": {"new_connections_per_sec": 5},
        },
        {
            "name": "udp",
            "protocol": "udp",
            "listen_port": p["udp"],
            "target": f"{LOOPBACK}:{next(iter(udp_echo.received))}",
            "rate_limit": {"bandwidth_in_bps": UDP_CAP},
        },
        {
            "name": "udpconc",
            "protocol": "udp",
            "listen_port": p["udpconc"],
            "target": f"{LOOPBACK}:{next(iter(udp_echo.received))}",
            "rate_limit": {"concurrent_connections": 2},
        },
    ]
    proc = standalone_module(rules, shards=2)
    try:
        yield Setup(proc, p, samples, origins, udp_echo)
    finally:
        for o in origins.values():
            o.close()
        udp_echo.close()


@pytest.fixture
def fresh(setup: Setup) -> Setup:
    """The setup with an empty sample list (each measuring test starts clean)."""
    with setup.samples.lock:
        setup.samples.points.clear()
    return setup


# ------------------------------------------------------------------ bandwidth


def _parallel_uploads(fresh: Setup, conns: int, seconds: int) -> None:
    """``conns`` uploads spread over the shards, ``seconds`` at the cap in all;
    every byte arrives and the measured rate is within the tolerance of the cap."""
    socks = spread_connections(fresh.proc, fresh.ports["capped"], "capped", conns)
    per_conn = seconds * CAP_IN // len(socks)
    try:
        parallel([lambda s=s: upload(s, per_conn) for s in socks])
    finally:
        for s in socks:
            s.close()
    assert fresh.samples.total == per_conn * len(socks)
    assert_rate(f"{len(socks)} uploads over 2 shards for {seconds} s", fresh.samples, CAP_IN)


def test_parallel_uploads_share_one_cap_across_shards(fresh: Setup) -> None:
    _parallel_uploads(fresh, 4, 5)


@pytest.mark.slow
def test_ten_second_upload_over_six_connections(fresh: Setup) -> None:
    """The contract's figure over a long run: ±2 % on the whole transfer too."""
    _parallel_uploads(fresh, 6, 10)
    _, whole, _ = fresh.samples.rates()
    assert abs(whole / CAP_IN - 1) <= TOLERANCE


def test_one_connection_gets_the_whole_cap(fresh: Setup) -> None:
    """One connection lives in one shard: it must still get the rule's whole cap
    (a per-shard split would give it half), because the shards share one bucket."""
    run = fresh.proc.env["PORTUNUS_RUNTIME_DIR"]
    with connect(fresh.ports["capped"], timeout=30) as s:
        upload(s, 2 * CAP_IN)
    assert fresh.samples.total == 2 * CAP_IN
    assert_rate("1 upload", fresh.samples, CAP_IN)
    assert any(p.endswith(".rl") for p in os.listdir(f"{run}/udp-flows")), "no shared bucket file"


def test_download_cap(fresh: Setup) -> None:
    """bandwidth_out_bps paces target -> client (measured by the reading client)."""
    got = Samples()
    with connect(fresh.ports["out"], timeout=30) as s:
        s.shutdown(socket.SHUT_WR)
        buf = bytearray(256 * 1024)
        while n := s.recv_into(buf):
            got.add(n)
    assert got.total == 2 * CAP_OUT
    assert_rate("1 download", got, CAP_OUT)


def test_client_reset_mid_upload_closes_the_paced_connection(fresh: Setup) -> None:
    """A client that resets while the paced relay still holds its bytes: the
    connection (and its upstream) must end, not hang (uvloop drops a reader whose
    socket reports an error, so the shard sweeps paced connections for resets)."""
    sink = fresh.origins["sink"]
    before = len(sink.records)
    stop = threading.Event()
    with connect(fresh.ports["capped"], timeout=30) as s:

        def push() -> None:
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    s.sendall(BUF[:65536])

        t = threading.Thread(target=push, daemon=True)
        t.start()
        wait_for(lambda: fresh.samples.total > CAP_IN // 4, 5, what="the upload to flow")
        stop.set()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        t.join(10)
    rec = sink.wait_connections(before + 1)[before]
    wait_for(rec.done.is_set, 5, what="the upstream of the reset connection to close")
    wait_for(
        lambda: fresh.proc.scrape().value("portunus_rule_active_connections", rule="capped") == 0,
        5,
        what="no open connection left on the rule",
    )


# ------------------------------------------------------------------ connections


def accepted(port: int, timeout: float = 5.0) -> bool:
    """Connect and ping: True if the echo answered, False if Portunus closed the
    connection at once (refused by a limit)."""
    with connect(port, timeout=timeout) as s:
        try:
            s.sendall(b"x")
            return s.recv(1) == b"x"
        except (ConnectionResetError, BrokenPipeError):
            return False


def test_concurrent_connections_cap(setup: Setup) -> None:
    proc, port = setup.proc, setup.ports["conc"]
    mark = proc.log_mark()
    live = spread_connections(proc, port, "conc", 3)  # 3 connections, both shards
    try:
        assert len(live) == 3
        for s in live:
            s.sendall(b"a")
            assert recv_exact(s, 1) == b"a"
        started = time.monotonic()
        assert not accepted(port), "a 4th connection was let in while 3 are live"
        assert time.monotonic() - started < 1.0, "the 4th connection was not closed at once"
        for s in live:  # the 3 are unaffected
            s.sendall(b"b")
            assert recv_exact(s, 1) == b"b"
        live.pop().close()
        wait_for(
            lambda: accepted(port), 5, interval=0.05, what="a slot after one connection closed"
        )
    finally:
        for s in live:
            s.close()
    rec = proc.wait_log("rate_limit.refused", since=mark, rule="conc")
    assert rec["limit"] == "concurrent_connections"
    assert (
        proc.scrape().value(
            "portunus_rate_limit_refused_total", rule="conc", limit="concurrent_connections"
        )
        >= 1
    )


def test_new_connections_per_sec_cap(setup: Setup) -> None:
    """5/s with the default burst (1 s = 5): over ~2 s of 25 attempts/s about
    5 + 5 × 2 get in, whichever shard they land on."""
    port = setup.ports["cps"]
    results: list[bool] = []
    started = time.monotonic()
    while time.monotonic() - started < 2.0:
        results.append(accepted(port))
        time.sleep(0.04)
    elapsed = time.monotonic() - started
    ok = sum(results)
    expected = 5 + 5 * elapsed
    print(
        f"new connections: {ok} of {len(results)} accepted in {elapsed:.2f} s, expected ~{expected:.1f}"
    )
    assert results[:5] == [True] * 5, "the burst was not let in"
    assert ok <= expected + 1, "more new connections than the cap let in"
    assert ok >= min(len(results), expected - 2), "refused below the cap"
    assert (
        setup.proc.scrape().value(
            "portunus_rate_limit_refused_total", rule="cps", limit="new_connections_per_sec"
        )
        == len(results) - ok
    )


# ------------------------------------------------------------------ UDP


def test_udp_datagrams_over_the_cap_are_dropped(setup: Setup) -> None:
    """bandwidth_in_bps on a UDP rule: datagrams beyond the cap are dropped and counted."""
    echo = setup.udp_echo
    target = next(iter(echo.received))
    before = echo.received[target]
    payload = bytes(1000)
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((LOOPBACK, setup.ports["udp"]))
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < 2.0:
            for _ in range(20):  # ~2 MB/s offered, 4 × the cap
                s.send(payload)
                sent += 1
            time.sleep(0.01)
    time.sleep(0.2)  # the origin thread drains its socket
    got = echo.received[target] - before
    expected = 64 * 1024 + UDP_CAP * elapsed  # default burst (64 KiB floor) + rate
    print(
        f"UDP: {got} of {sent * len(payload)} bytes passed in {elapsed:.2f} s, expected ~{expected:.0f}"
    )
    assert abs(got / expected - 1) <= 0.05

    def dropped() -> float:
        return setup.proc.scrape().value(
            "portunus_rate_limit_dropped_datagrams_total", rule="udp", direction="in"
        )

    # Counted per second by each shard; the kernel may drop a few more itself.
    want = sent - got / len(payload)
    wait_for(
        lambda: abs(dropped() - want) <= sent * 0.02,
        5,
        what=lambda: f"~{want:.0f} dropped datagrams counted (have {dropped():.0f})",
    )


# ------------------------------------------------------------------ splice


def test_unlimited_rule_keeps_splice(
    standalone: StandaloneFactory, origin: Callable[..., Origin], ports: PortAllocator
) -> None:
    """A capped rule relays in userspace (no pipe), an uncapped one still splices
    (the shard keeps its pipe in the pool) and runs far above any cap."""
    samples = Samples()
    sink = origin(metered_sink(samples))
    capped, free = ports.port(), ports.port()
    proc = standalone(
        [
            {
                "name": "capped",
                "listen_port": capped,
                "target": sink.address,
                "rate_limit": {"bandwidth_in_bps": CAP_IN, "bandwidth_out_bps": CAP_IN},
            },
            {"name": "free", "listen_port": free, "target": sink.address},
        ]
    )
    shard = proc.shards()[0].pid
    baseline = pipe_fds(shard)
    with connect(capped, timeout=30) as s:
        upload(s, CAP_IN // 2)
    assert pipe_fds(shard) == baseline, "a capped rule went through splice"
    started = time.monotonic()
    with connect(free, timeout=30) as s:
        upload(s, 20 * CAP_IN)
    secs = time.monotonic() - started
    assert pipe_fds(shard) > baseline, "the uncapped rule did not use splice"
    assert 20 * CAP_IN / secs > 5 * CAP_IN, (
        f"the uncapped rule ran at {20 * CAP_IN / secs / MB:.1f} MB/s"
    )


# ------------------------------------------------------------------ server: PUT


def test_put_rate_limit_applies_to_open_and_new_transfers(
    server: ServerFactory, origin: Callable[..., Origin], ports: PortAllocator
) -> None:
    samples = Samples()
    sink = origin(metered_sink(samples))
    srv = server(shards=2)
    listen = ports.port()
    rule = srv.cli_json(
        "push-rule", "local", str(listen), sink.address, "--bandwidth-in-bps", str(2 * MB)
    )
    assert rule["rate_limit"] == {"bandwidth_in_bps": 2 * MB}

    def clear() -> None:
        with samples.lock:
            samples.points.clear()

    def measure(cap: float, secs: float = 1.5) -> None:
        clear()
        with connect(listen, timeout=30) as s:
            upload(s, int(cap * secs))
        assert_rate(f"new connection at {cap / MB:.0f} MB/s", samples, cap, tolerance=0.03)

    def put(rate_limit: dict[str, int] | None) -> None:
        status, body = srv.http("PUT", f"/v1/rules/{rule['id']}", {"rate_limit": rate_limit})
        assert status == 200, body
        assert body["rate_limit"] == rate_limit

    measure(2 * MB)
    # A connection open across the update is re-paced at once.
    stop = threading.Event()
    with connect(listen, timeout=30) as s:

        def push() -> None:
            with contextlib.suppress(OSError):  # ended by the shutdown below
                while not stop.is_set():
                    s.sendall(BUF[:65536])

        pusher_ = threading.Thread(target=push, daemon=True)
        pusher_.start()
        try:
            wait_for(lambda: samples.total > 0, 5, what="the open upload to flow")
            put({"bandwidth_in_bps": 6 * MB})
            time.sleep(0.2)
            clear()
            time.sleep(1.5)
            steady, _, _ = samples.rates(skip=0.2)
            print(f"open connection after PUT: {steady / MB:.3f} MB/s")
            assert abs(steady / (6 * MB) - 1) <= 0.03
        finally:
            stop.set()
            # Reset rather than close: what is still buffered must not flow on
            # and share the cap with the next measurement.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            pusher_.join(10)
    wait_for(lambda: all(r.done.is_set() for r in sink.records), 15, what="the open upload to end")
    measure(6 * MB)
    put(None)
    started = time.monotonic()
    with connect(listen, timeout=30) as s:
        upload(s, 40 * MB)
    assert 40 * MB / (time.monotonic() - started) > 30 * MB, "the lifted cap still paces"


def test_udp_concurrent_flows_cap(setup: Setup) -> None:
    """concurrent_connections on a UDP rule caps live flows: a third client gets nothing."""
    port = setup.ports["udpconc"]
    socks = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(0.3)
            s.connect((LOOPBACK, port))
            socks.append(s)

        def answered(s: socket.socket) -> bool:
            for _ in range(3):
                s.send(b"hi")
                try:
                    return s.recv(100).endswith(b":hi")
                except TimeoutError:
                    continue
            return False

        assert answered(socks[0]) and answered(socks[1])
        assert not answered(socks[2]), "a third UDP flow was let in"
        assert answered(socks[0]), "a live flow stopped"
    finally:
        for s in socks:
            s.close()
    assert (
        setup.proc.scrape().value(
            "portunus_rate_limit_refused_total", rule="udpconc", limit="concurrent_connections"
        )
        >= 1
    )
