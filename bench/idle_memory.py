"""Memory held by idle connections: RSS growth of the forwarding process for 10k conns.

Both contenders run one data-plane process so the number is per process, not spread
over workers: Portunus with ``--shards 1`` (its shard's RSS; the supervisor is shown
separately) and nginx stream with ``worker_processes 1`` from its own config, because
the shared run-peer nginx caps worker_connections at 8000 (4000 proxied sessions)
and haproxy's run-peer config caps maxconn at 4000.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench.common import (
    LOOPBACK,
    Service,
    StartError,
    free_port,
    is_listening,
    services,
    start_service,
    tool,
    wait_for,
)
from bench.forwarders import Endpoint, start_portunus
from bench.origins import start_echo
from bench.results import BenchResult, Metric, Settings
from bench.rounds import Sample, log, run_rounds

MIB = 2**20
NOMINAL_CONNS = 10_000
FD_RESERVE = 1000  # listeners, epoll, logs, Portunus' pool of up to 256 idle pipes
WARMUP_CONNS = 200
BATCH = 500
# Keep the forwarder's accept queue short: a full queue drops SYNs, which costs a
# 1 s retransmit per connection and makes the run slow rather than wrong.
MAX_AHEAD = 2000
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def established(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (the origin's side)."""
    suffix = f":{port:04X}"
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split(None, 4)
                    if fields[3] == "01" and fields[1].endswith(suffix):
                        count += 1
        except OSError:
            continue
    return count


def rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def stable_rss(procs: list[psutil.Process], timeout: float = 8.0) -> int:
    """RSS once two readings 0.4 s apart agree within 64 KiB (allocation settled)."""
    last = rss(procs)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.4)
        now = rss(procs)
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


def ping(socks: list[socket.socket]) -> None:
    """One byte each way on every connection: proves the whole chain is connected."""
    for s in socks:
        s.sendall(b"x")
    for s in socks:
        if s.recv(1) != b"x":
            raise RuntimeError("echo through the forwarder failed")


def open_conns(port: int, origin_port: int, n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            socks.append(socket.create_connection((LOOPBACK, port), timeout=10))
            opened = i + 1
            if opened % BATCH == 0 and not wait_for(
                lambda n=opened: established(origin_port) >= n - MAX_AHEAD, 30, 0.02
            ):
                raise RuntimeError(f"forwarder stalled at {established(origin_port)} of {i + 1}")
        if not wait_for(lambda: established(origin_port) >= n, 60, 0.1):
            raise RuntimeError(f"only {established(origin_port)} of {n} reached the origin")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def num_fds(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.num_fds()
        except psutil.NoSuchProcess:
            continue
    return total


def feasible_conns(requested: int) -> int:
    """How many proxied connections one process can hold under our fd hard limit.

    A forwarder needs two sockets per connection. Without CAP_SYS_RESOURCE (as in
    containers) the hard RLIMIT_NOFILE cannot be raised, so with the common 20000 a
    single process cannot hold 10k; measure fewer and scale to 10k (growth is linear).
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return requested
    return min(requested, (hard - FD_RESERVE) // 2)


def measure(
    ep: Endpoint,
    origin_port: int,
    n: int,
    split: Callable[[list[psutil.Process]], tuple[list[psutil.Process], list[psutil.Process]]],
) -> Sample:
    """RSS growth of the data-plane processes (and the rest) for ``n`` idle conns."""
    assert ep.service is not None
    warm = open_conns(ep.port, origin_port, WARMUP_CONNS)
    ping(warm)
    for s in warm:
        s.close()
    wait_for(lambda: established(origin_port) == 0, 10)
    workers, others = split(ep.service.processes())
    if not workers:
        raise RuntimeError(f"no data-plane process found under pid {ep.service.pid}")
    base, base_other, base_fds = stable_rss(workers), rss(others), num_fds(workers)
    start = time.monotonic()
    socks = open_conns(ep.port, origin_port, n)
    try:
        opened = time.monotonic() - start
        idle = stable_rss(workers)
        other = rss(others)
        fds = num_fds(workers)
    finally:
        for s in socks:
            s.close()
    log(f"idle_memory {ep.name}: {n} connections opened in {opened:.1f}s")
    return {
        "idle_10k_mib": (idle - base) / MIB * NOMINAL_CONNS / n,
        "idle_mib": (idle - base) / MIB,
        "per_conn_kib": (idle - base) / n / 1024,
        "fds_per_conn": (fds - base_fds) / n,
        "base_mib": base / MIB,
        "other_mib": (other - base_other) / MIB,
    }


def split_portunus(
    procs: list[psutil.Process],
) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """Shards are named ``portunus: shard N`` by setproctitle; the rest is supervision."""
    shards, rest = [], []
    for p in procs:
        try:
            title = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        (shards if "shard" in title else rest).append(p)
    return shards, rest


def split_nginx(procs: list[psutil.Process]) -> tuple[list[psutil.Process], list[psutil.Process]]:
    return procs[1:], procs[:1]  # master first, then its workers


def start_nginx_single(target_port: int, log_dir: Path, max_conns: int) -> Endpoint:
    """nginx stream, one worker, limits sized for ``max_conns`` proxied sessions."""
    port = free_port()
    workdir = log_dir / f"nginx-idle-{port}"
    workdir.mkdir()
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"load_module {NGINX_STREAM_MODULE};\n"
        f"worker_processes 1; pid {workdir}/n.pid; error_log {workdir}/err.log; daemon off;\n"
        f"worker_rlimit_nofile {2 * max_conns + 1000};\n"
        f"events {{ worker_connections {2 * max_conns + 500}; }}\n"
        f"stream {{ server {{ listen {LOOPBACK}:{port} backlog=4096; "
        f"proxy_pass {LOOPBACK}:{target_port}; }} }}\n"
    )
    argv = [tool("nginx"), "-c", str(conf), "-p", str(workdir)]
    svc = start_service(f"nginx-idle-{port}", argv, log_dir, ready=lambda: is_listening(port))
    return Endpoint("nginx", port, svc)


def run(settings: Settings) -> BenchResult:
    n = feasible_conns(settings.idle_conns)
    with services() as started:
        origin, origin_port = start_echo(settings.log_dir)
        started.append(origin)
        eps: dict[str, Endpoint | str] = {}
        for name, starter in (
            ("portunus", lambda: start_portunus(origin_port, settings.log_dir, shards=1)),
            ("nginx", lambda: start_nginx_single(origin_port, settings.log_dir, n)),
        ):
            if name not in settings.forwarders:
                continue
            try:
                ep = starter()
            except StartError as exc:
                eps[name] = str(exc)
                continue
            assert isinstance(ep.service, Service)
            started.append(ep.service)
            eps[name] = ep
        splits = {"portunus": split_portunus, "nginx": split_nginx}
        per = run_rounds(
            "idle_memory", eps, 1, lambda ep: measure(ep, origin_port, n, splits[ep.name])
        )
    notes = [
        "haproxy and socat are not measured: run-peer haproxy caps maxconn at 4000, "
        "socat forks one process per connection."
    ]
    if n != NOMINAL_CONNS:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        notes.insert(
            0,
            f"Measured with {n:,} connections, not {NOMINAL_CONNS:,}: the hard "
            f"RLIMIT_NOFILE here is {hard} and cannot be raised (no CAP_SYS_RESOURCE), "
            "and one process needs two fds per proxied connection. The headline column "
            f"scales the measured growth linearly to {NOMINAL_CONNS:,}.",
        )
    return BenchResult(
        name="idle_memory",
        title=f"Idle connection memory (per {NOMINAL_CONNS:,} connections)",
        method=(
            f"{n:,} TCP connections opened from the harness through the forwarder to a "
            "uvloop echo origin and left idle (no payload); growth = RSS of the data-plane "
            "process (Portunus --shards 1: the `portunus: shard 0` process; nginx stream "
            "with worker_processes 1 and limits sized for the test: its worker) once every "
            "connection reached the origin and RSS settled, minus RSS before (taken after "
            f"a {WARMUP_CONNS}-connection warm-up with one byte echoed on each). "
            "`fds/conn` = file descriptors added per connection; `other` = supervisor / "
            "nginx master growth. One measurement per contender (memory is not noisy)."
        ),
        metrics=[
            Metric("idle_10k_mib", f"growth per {NOMINAL_CONNS // 1000}k conns MiB", False, 1),
            Metric("idle_mib", "measured growth MiB", False, 1),
            Metric("per_conn_kib", "KiB/conn", False, 2),
            Metric("fds_per_conn", "fds/conn", False, 2),
            Metric("base_mib", "base RSS MiB", False, 1),
            Metric("other_mib", "other growth MiB", False, 1),
        ],
        per_forwarder=per,
        extra={"connections": n},
        notes=notes,
    )
