"""Failover: kill the primary origin under a steady stream of new connections.

Target (issue 5): "after the primary dies, ≥ 99 % of new connections succeed within
1 s (report the exact figure)".  Each contender forwards one port to two tagged echo
origins (bench/tag_echo.py): the primary (priority 1, tag ``P``) and the backup
(priority 2, tag ``B``).  A round, per contender:

1. ``RATE`` new connections per second, open loop (started on a fixed schedule, not
   after the previous one finished), each sends 16 bytes and expects tag + echo
   within ``CONN_TIMEOUT``;
2. after ``PRE`` seconds the primary origin is killed with SIGKILL;
3. ``DOWN`` seconds later it is started again on the same port;
4. the stream goes on for ``POST`` seconds, so traffic can return to it.

Reported per round: % ok of the connections started in the first second after the
kill (the target), % ok overall, kill → first connection served by the backup, and
restart → first / last-backup connection (traffic back on the primary).

Configured comparably — fail after 3, recover after 2 checks 1 s apart:
Portunus ``targets`` with priorities and ``health_check_interval_secs = 1`` (a
failed connect falls through to the next target inside the same client connection;
3 failed connects in 30 s mark a target down; 2 TCP health checks bring it back);
HAProxy ``server … check inter 1s fall 3 rise 2`` + ``backup``, ``option redispatch
1``, ``retries 2``, ``timeout connect 1s``; nginx stream ``upstream`` with
``max_fails=3 fail_timeout=1s``, backup server, ``proxy_next_upstream on`` (open
source nginx has no active health checks; after fail_timeout it retries the primary
with a real connection).  run-peer cannot configure two targets, so the configs are
written here, with run-peer's thread/worker counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    LOOPBACK,
    Service,
    StartError,
    free_port,
    http_ok,
    is_listening,
    services,
    start_service,
    tool,
)
from bench.forwarders import Endpoint, portunus_bin
from bench.results import BenchResult, Metric, Settings
from bench.rounds import Sample, log, run_rounds

RATE = 300  # new connections per second
CONN_TIMEOUT = 2.0
PAYLOAD = b"failover-bench-!"  # 16 bytes
CONTENDERS = ("portunus", "haproxy", "nginx")


@dataclass(frozen=True)
class Timeline:
    pre: float = 2.0
    down: float = 4.0
    post: float = 6.0


@dataclass(slots=True)
class Attempt:
    start: float
    end: float
    tag: str  # "P", "B" or "" on failure
    error: str


# ------------------------------------------------------------------ origins


@dataclass
class Origins:
    """The two tagged echo origins; the primary is replaced each time it restarts."""

    log_dir: Path
    started: list[Service]
    primary_port: int = field(default_factory=free_port)
    backup_port: int = field(default_factory=free_port)
    primary: Service | None = None
    backup: Service | None = None
    restarts: int = 0

    def _start(self, port: int, tag: str) -> Service:
        script = Path(__file__).with_name("tag_echo.py")
        name = f"origin-{tag}-{port}-{self.restarts}"
        svc = start_service(
            name, [sys.executable, str(script), str(port), tag], self.log_dir,
            ready=lambda: is_listening(port),
        )  # fmt: skip
        self.started.append(svc)
        return svc

    def start(self) -> None:
        self.backup = self._start(self.backup_port, "B")
        self.primary = self._start(self.primary_port, "P")

    def ensure_primary(self) -> None:
        if self.primary is None or not self.primary.alive():
            self.restart_primary()

    def kill_primary(self) -> None:
        assert self.primary is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.primary.pid, signal.SIGKILL)

    def restart_primary(self) -> None:
        if self.primary is not None:
            self.primary.stop(grace=1.0)  # reaps the killed one
        self.restarts += 1
        self.primary = self._start(self.primary_port, "P")


# ------------------------------------------------------------------- client


async def one_conn(port: int, out: list[Attempt]) -> None:
    start = time.perf_counter()
    tag, error = "", ""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(CONN_TIMEOUT):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(PAYLOAD)
            reply = await reader.readexactly(len(PAYLOAD) + 1)
        if reply[1:] != PAYLOAD:
            error = "bad echo"
        else:
            tag = chr(reply[0])
    except TimeoutError:
        error = "timeout"
    except asyncio.IncompleteReadError:
        error = "closed"
    except OSError as exc:
        error = type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
    out.append(Attempt(start, time.perf_counter(), tag, error))


async def scenario(port: int, origins: Origins, tl: Timeline, rate: int) -> dict[str, float]:
    """Run the load and the kill/restart; the time marks and every attempt."""
    loop = asyncio.get_running_loop()
    attempts: list[Attempt] = []
    tasks: set[asyncio.Task[None]] = set()
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    total = tl.pre + tl.down + tl.post
    restart: asyncio.Future[None] | None = None
    i = 0
    while True:
        now = time.perf_counter() - t0
        if now >= total:
            break
        if "kill" not in marks and now >= tl.pre:
            assert origins.primary is not None
            proc = origins.primary.proc
            marks["kill"] = time.perf_counter()
            origins.kill_primary()
            dead = loop.run_in_executor(None, proc.wait)
            dead.add_done_callback(lambda _: marks.setdefault("dead", time.perf_counter()))
        if restart is None and now >= tl.pre + tl.down:
            marks["restart_begin"] = time.perf_counter()
            restart = loop.run_in_executor(None, origins.restart_primary)
        if restart is not None and "restart" not in marks and restart.done():
            restart.result()
            marks["restart"] = time.perf_counter()  # primary accepting again
        due = t0 + i / rate
        if time.perf_counter() >= due:
            task = asyncio.create_task(one_conn(port, attempts))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            continue
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
    if restart is not None:
        await restart
        marks.setdefault("restart", time.perf_counter())
    await asyncio.gather(*tasks)
    return analyse(attempts, marks, tl)


def analyse(attempts: list[Attempt], marks: dict[str, float], tl: Timeline) -> Sample:
    kill, restart = marks["kill"], marks["restart"]
    ok = [a for a in attempts if a.tag]
    first_s = [a for a in attempts if kill <= a.start < kill + 1.0]
    dead = marks.get("dead", kill)
    after_death = [a for a in attempts if dead <= a.start < dead + 1.0]
    pre = [a for a in attempts if a.start < kill]
    sample: Sample = {
        "ok_first_s_pct": 100.0 * sum(1 for a in first_s if a.tag) / max(1, len(first_s)),
        "ok_first_s_after_exit_pct": 100.0
        * sum(1 for a in after_death if a.tag)
        / max(1, len(after_death)),
        "kill_to_exit_ms": (dead - kill) * 1000,
        "ok_pct": 100.0 * len(ok) / max(1, len(attempts)),
        "failed": float(len(attempts) - len(ok)),
        "failed_first_s": float(sum(1 for a in first_s if not a.tag)),
        "conns_first_s": float(len(first_s)),
        "conns": float(len(attempts)),
        "pre_on_primary_pct": 100.0 * sum(1 for a in pre if a.tag == "P") / max(1, len(pre)),
    }
    backup_ends = [a.end for a in ok if a.tag == "B" and a.end >= kill]
    sample["first_backup_ms"] = (min(backup_ends) - kill) * 1000 if backup_ends else -1.0
    slow = [a.end - a.start for a in first_s if a.tag]
    sample["max_conn_ms_first_s"] = max(slow) * 1000 if slow else -1.0
    back = [a for a in ok if a.start >= restart]
    primary_ends = [a.end for a in back if a.tag == "P"]
    sample["return_first_ms"] = (min(primary_ends) - restart) * 1000 if primary_ends else -1.0
    last_backup = [a.start for a in back if a.tag == "B"]
    sample["return_all_ms"] = (max(last_backup) - restart) * 1000 if last_backup else 0.0
    failed = [a for a in attempts if not a.tag]
    if failed:
        kinds: dict[str, int] = {}
        for a in failed:
            kinds[a.error] = kinds.get(a.error, 0) + 1
        offsets = sorted((a.start - kill) * 1000 for a in failed)
        log(
            f"failover: {len(failed)} failed ({kinds}); started {offsets[0]:+.1f} … "
            f"{offsets[-1]:+.1f} ms from the kill"
        )
    return sample


# --------------------------------------------------------------- forwarders


def portunus_toml(port: int, origins: Origins, metrics: int) -> str:
    return (
        f'metrics_listen = "{LOOPBACK}:{metrics}"\n'
        f'listen_address = "{LOOPBACK}"\n'
        'log_format = "json"\n'
        "shutdown_drain_timeout_secs = 1\n"
        "\n[[rule]]\n"
        'name = "failover"\n'
        'protocol = "tcp"\n'
        f"listen_port = {port}\n"
        "health_check_interval_secs = 1\n"
        f'targets = [{{host = "{LOOPBACK}", port = {origins.primary_port}, priority = 1}}, '
        f'{{host = "{LOOPBACK}", port = {origins.backup_port}, priority = 2}}]\n'
    )


def haproxy_cfg(port: int, origins: Origins, cpus: int) -> str:
    return f"""global
  maxconn 4000
  nbthread {cpus}
defaults
  mode tcp
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  retries 2
  option redispatch 1
listen f
  bind {LOOPBACK}:{port}
  default-server check inter 1s fall 3 rise 2 observe layer4 error-limit 3 on-error mark-down
  server primary {LOOPBACK}:{origins.primary_port}
  server backup {LOOPBACK}:{origins.backup_port} backup
"""


def nginx_conf(port: int, origins: Origins, cpus: int, workdir: Path) -> str:
    return f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes {cpus}; pid {workdir}/n.pid; error_log {workdir}/err.log; daemon off;
worker_rlimit_nofile 20000;
events {{ worker_connections 8000; }}
stream {{
  upstream origins {{
    zone origins 64k;
    server {LOOPBACK}:{origins.primary_port} max_fails=3 fail_timeout=1s;
    server {LOOPBACK}:{origins.backup_port} backup;
  }}
  server {{
    listen {LOOPBACK}:{port} reuseport backlog=4096;
    proxy_connect_timeout 1s;
    proxy_next_upstream on;
    proxy_pass origins;
  }}
}}
"""


def start_contender(name: str, origins: Origins, log_dir: Path) -> Endpoint:
    port = free_port()
    workdir = log_dir / f"failover-{name}-{port}"
    workdir.mkdir()
    cpus = os.cpu_count() or 1
    ready = lambda: is_listening(port)  # noqa: E731
    if name == "portunus":
        binary = portunus_bin()
        if binary is None:
            raise StartError("portunus-standalone not found (set PORTUNUS_BIN)")
        metrics = free_port()
        cfg = workdir / "portunus.toml"
        cfg.write_text(portunus_toml(port, origins, metrics))
        argv = [binary, "--config", str(cfg)]
        url = f"http://{LOOPBACK}:{metrics}/metrics"
        ready = lambda: is_listening(port) and http_ok(url)  # noqa: E731
    elif name == "haproxy":
        cfg = workdir / "h.cfg"
        cfg.write_text(haproxy_cfg(port, origins, cpus))
        argv = [tool("haproxy"), "-db", "-f", str(cfg)]
    elif name == "nginx":
        cfg = workdir / "n.conf"
        cfg.write_text(nginx_conf(port, origins, cpus, workdir))
        argv = [tool("nginx"), "-c", str(cfg), "-p", str(workdir)]
    else:
        raise StartError(f"{name} has no failover configuration here")
    svc = start_service(f"failover-{name}-{port}", argv, log_dir, ready=ready, timeout=20.0)
    return Endpoint(name, port, svc)


def run_scenario(port: int, origins: Origins, tl: Timeline, rate: int) -> Sample:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(scenario(port, origins, tl, rate))
    return uvloop.run(scenario(port, origins, tl, rate))


def pooled_notes(per: dict[str, list[Sample] | str]) -> list[str]:
    """The exact figure over all rounds: ok / started in the 1st s after each kill."""
    parts = []
    for name, samples in per.items():
        if isinstance(samples, str) or not samples:
            continue
        total = sum(s["conns_first_s"] for s in samples)
        failed = sum(s["failed_first_s"] for s in samples)
        parts.append(
            f"{name} {total - failed:.0f} / {total:.0f} = {100 * (total - failed) / total:.2f} %"
        )
    if not parts:
        return []
    return [
        "Pooled over all rounds, connections started in the first second after the "
        "SIGKILL that succeeded: " + "; ".join(parts) + "."
    ]


def run(settings: Settings) -> BenchResult:
    """``settings.rounds`` rounds (quick: shorter timeline, 200 conn/s)."""
    tl = Timeline(1.0, 2.0, 4.0) if settings.quick else Timeline()
    rate = 200 if settings.quick else RATE
    with services() as started:
        origins = Origins(settings.log_dir, started)
        origins.start()
        eps: dict[str, Endpoint | str] = {}
        for name in CONTENDERS:
            if name not in settings.forwarders:
                continue
            try:
                ep = start_contender(name, origins, settings.log_dir)
            except StartError as exc:
                eps[name] = str(exc)
                continue
            assert ep.service is not None
            started.append(ep.service)
            eps[name] = ep

        def measure(ep: Endpoint) -> Sample:
            origins.ensure_primary()
            time.sleep(2.5)  # health checks of every contender see the primary up again
            return run_scenario(ep.port, origins, tl, rate)

        per = run_rounds("failover", eps, settings.rounds, measure)
    return BenchResult(
        name="failover",
        title="Failover: primary origin killed under new connections",
        method=(
            f"{rate} new connections/s (open loop, Python asyncio), each sends 16 bytes and "
            f"expects the origin's tag + echo within {CONN_TIMEOUT:.0f} s; primary (prio 1) "
            f"killed with SIGKILL after {tl.pre:.0f} s, restarted {tl.down:.0f} s later, "
            f"{tl.post:.0f} s more. First column = % of the connections started in the "
            "first second after the SIGKILL that succeeded ('after exit': after the "
            "killed process was reaped, i.e. its listener gone); return = restart (primary "
            "accepting) → first connection served by it / start of the last one served by "
            "the backup. Portunus health_check_interval_secs = 1; HAProxy check inter 1s "
            "fall 3 rise 2 observe layer4 error-limit 3 on-error mark-down, backup, option redispatch 1, retries 2; nginx max_fails=3 "
            "fail_timeout=1s, backup, proxy_next_upstream on. See bench/failover.py."
        ),
        metrics=[
            Metric("ok_first_s_pct", "ok % in 1st s after kill", True, 2),
            Metric("ok_first_s_after_exit_pct", "ok % in 1st s after exit", True, 2),
            Metric("ok_pct", "ok % overall", True, 2),
            Metric("failed_first_s", "failed in 1st s", False, 0),
            Metric("failed", "failed overall", False, 0),
            Metric("first_backup_ms", "kill → 1st backup ok ms", False, 1),
            Metric("max_conn_ms_first_s", "slowest ok conn in 1st s ms", False, 1),
            Metric("return_first_ms", "restart → 1st on primary ms", False, 0),
            Metric("return_all_ms", "restart → last on backup ms", False, 0),
            Metric("conns", "connections", True, 0),
            Metric("kill_to_exit_ms", "SIGKILL → exit ms", False, 2),
        ],
        per_forwarder=per,
        notes=pooled_notes(per),
        extra={"rate": rate, "timeline": [tl.pre, tl.down, tl.post]},
    )
