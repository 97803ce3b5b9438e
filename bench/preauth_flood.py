"""Memory an unauthenticated flood costs the edge gateway, against TLS peers.

    python -m bench.run --only preauth_flood      (or: python -m bench.preauth_flood)

Contenders, each a TLS listener on 127.0.0.1 measured as the one process that
holds the connections:

- ``portunus``: ``portunus-server serve --shards 1`` with the default anonymous
  limits (``edge_preauth_max_connections`` 128, ``edge_preauth_max_per_source``
  16); the control process.
- ``portunus-unlimited``: both limits at 2,000, so every hostile connection is
  admitted: the cost of one admitted anonymous connection, and the worst case a
  flood from many addresses could reach with limits raised that far.
- ``portunus-before``: the code before the anonymous limits (``BEFORE``, taken
  with ``git archive``), for the oversized-frame flood only (for stalled
  handshakes it held the connections in asyncio's TLS server just the same).
- ``haproxy`` (``bind ... ssl crt``, nbthread 1) and ``nginx`` (stream
  ``listen ... ssl``, one worker): the same P-256 certificate; the process
  measured is haproxy's, nginx's worker.

Two floods from the harness, 1,000 connections each:

1. **stalled handshakes**: 1,000 connections opened back to back, each sends a real
   TLS 1.3 ClientHello and then nothing: the server has done its half of the
   handshake and holds its state.  Growth = RSS 1.5 s after the last connect
   (well within every contender's handshake deadline) minus RSS before; ``held`` =
   connections the server still had open then, ``refused`` = closed at once.
2. **oversized first frames** (the Portunus rows only; for a TLS terminator the
   bytes after the handshake are payload for its backend, not a frame it buffers):
   1,000 TLS connections, ``OVERSIZED_CONCURRENCY`` at a time, each announcing a
   16 MiB frame and sending up to 15 MiB; growth = peak RSS (sampled every 20 ms)
   minus RSS before (it depends on how many are in flight, not on the total).

Each flood runs on a freshly started contender (an allocator keeps what a flood
made it take, which would hide the next flood's growth).  One measurement per
contender: memory is not noisy.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import LOOPBACK, StartError, free_port, is_listening, start_service, tool  # noqa: E402
from bench.results import BenchResult, Metric, Settings  # noqa: E402
from bench.rounds import log  # noqa: E402
from portunus.control.fleet.cert import ensure_server_cert  # noqa: E402
from tests.e2e.support import PortAllocator, ServerProc  # noqa: E402
from tests.e2e.support.hostile import Flood  # noqa: E402

MIB = 2**20
CONNS = 1000
OVERSIZED_CONCURRENCY = 40  # as in the report that opened issue 18
SETTLE_SECS = 1.5
# The last commit before the anonymous limits (the parent of this work).
BEFORE = "77bddcaa07c6711b24dfd84f07cb554274b9d48f"
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client (one record)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="gateway.bench.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def rss(proc: psutil.Process) -> int:
    return int(proc.memory_info().rss)


def settled(proc: psutil.Process, timeout: float = 6.0) -> int:
    last = rss(proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = rss(proc)
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


def _still_open(s: socket.socket) -> bool:
    """Drain what the server sent; False once it closed or reset the connection."""
    s.setblocking(False)
    try:
        while True:
            if not s.recv(65536):
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def stalled_handshakes(port: int, proc: psutil.Process, hello: bytes) -> dict[str, float]:
    base = settled(proc)
    socks: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(CONNS):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect((LOOPBACK, port))
                s.sendall(hello)
                socks.append(s)
            except OSError:
                refused += 1
                s.close()
        time.sleep(SETTLE_SECS)
        grown = rss(proc) - base
        held = sum(1 for s in socks if _still_open(s))
    finally:
        for s in socks:
            s.close()
    return {
        "stalled_mib": grown / MIB * 1000 / CONNS,
        "held": float(held),
        "refused": float(CONNS - held),
        "per_held_kib": grown / held / 1024 if held else 0.0,
        "base_mib": base / MIB,
    }


def oversized_frames(port: int, proc: psutil.Process) -> dict[str, float]:
    base = settled(proc)
    peak = base
    flood = Flood(
        LOOPBACK, port, {"oversized": OVERSIZED_CONCURRENCY}, body_bytes=15 * MIB, hold_secs=30
    )
    with flood:
        deadline = time.monotonic() + 600
        while flood.attempts < CONNS and time.monotonic() < deadline:
            peak = max(peak, rss(proc))
            time.sleep(0.02)
    peak = max(peak, rss(proc))
    after = settled(proc)
    log(f"preauth_flood oversized: {flood.attempts} attempts, {dict(flood.outcomes)}")
    return {"oversized_mib": (peak - base) / MIB, "kept_mib": (after - base) / MIB}


# ------------------------------------------------------------------ contenders


@contextmanager
def portunus(
    workdir: Path, name: str, settings: dict[str, Any], before: Path | None = None
) -> Iterator[tuple[int, psutil.Process]]:
    ports = PortAllocator()
    env = {"PYTHONPATH": str(before)} if before is not None else None
    srv = ServerProc(
        workdir=workdir,
        data_dir=workdir / name,
        ports=ports,
        settings=settings,
        shards=1,
        env=env,
        name=name,
    )
    if before is not None:
        srv.argv = [
            sys.executable,
            "-c",
            "import sys; from portunus.cli.server import main; sys.exit(main())",
            *srv.argv[1:],
        ]
    try:
        srv.start()
        srv.wait_ready(timeout=60)
        control = srv.child("control")
        if control is None:
            raise StartError(f"{name}: no control process")
        yield srv.control_port, control
    finally:
        srv.cleanup()


def extract_before(workdir: Path) -> Path:
    """The ``portunus`` package as of ``BEFORE``, for ``PYTHONPATH``."""
    out = workdir / "before"
    out.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", BEFORE, "portunus"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    probe = subprocess.run(
        [sys.executable, "-c", "import portunus, sys; print(portunus.__file__)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(out)},
        cwd=out,
        check=True,
    )
    if not probe.stdout.startswith(str(out)):
        raise StartError(
            f"the old package does not shadow the installed one: {probe.stdout.strip()}"
        )
    return out


def haproxy_cfg(port: int, pem: Path, sink: int) -> str:
    return f"""global
  maxconn 4000
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend f
  bind {LOOPBACK}:{port} ssl crt {pem}
  default_backend b
backend b
  server s {LOOPBACK}:{sink}
"""


def nginx_conf(port: int, crt: Path, key: Path, sink: int, workdir: Path) -> str:
    return f"""load_module {NGINX_STREAM_MODULE};
worker_processes 1; pid {workdir}/n.pid; error_log {workdir}/err.log; daemon off;
worker_rlimit_nofile 20000;
events {{ worker_connections 8000; }}
stream {{
  server {{
    listen {LOOPBACK}:{port} ssl backlog=4096;
    ssl_certificate {crt};
    ssl_certificate_key {key};
    ssl_handshake_timeout 60s;
    proxy_pass {LOOPBACK}:{sink};
  }}
}}
"""


@contextmanager
def peer(name: str, workdir: Path, certdir: Path) -> Iterator[tuple[int, psutil.Process]]:
    port, sink = free_port(), free_port()
    where = workdir / f"{name}-{port}"
    where.mkdir()
    crt, key = certdir / "server.crt", certdir / "server.key"
    if name == "haproxy":
        pem = where / "server.pem"
        pem.write_bytes(crt.read_bytes() + key.read_bytes())
        (where / "h.cfg").write_text(haproxy_cfg(port, pem, sink))
        argv = [tool("haproxy"), "-db", "-f", str(where / "h.cfg")]
    else:
        (where / "n.conf").write_text(nginx_conf(port, crt, key, sink, where))
        argv = [tool("nginx"), "-c", str(where / "n.conf"), "-p", str(where)]
    svc = start_service(f"{name}-tls-{port}", argv, workdir, ready=lambda: is_listening(port))
    try:
        procs = svc.processes()
        yield port, (procs[-1] if name == "nginx" else procs[0])  # nginx: its worker
    finally:
        svc.stop()


# ------------------------------------------------------------------ the run


def _measure(
    name: str,
    opener: Callable[[], Any],
    floods: list[Callable[[int, psutil.Process], dict[str, float]]],
    out: dict[str, list[dict[str, float]] | str],
) -> None:
    """Each flood on a freshly started contender: memory an allocator kept from
    one flood must not hide the next one's growth."""
    sample: dict[str, float] = {}
    try:
        for flood in floods:
            with opener() as (port, proc):
                sample.update(flood(port, proc))
        out[name] = [sample]
        log(f"preauth_flood {name}: {sample}")
    except (
        StartError,
        OSError,
        RuntimeError,
        AssertionError,
        subprocess.CalledProcessError,
    ) as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
        log(f"preauth_flood {name}: {out[name]}")


def run(settings: Settings) -> BenchResult:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ptn-preauth-", dir="/tmp"))
    hello = client_hello()
    stalled = lambda port, proc: stalled_handshakes(port, proc, hello)  # noqa: E731
    per: dict[str, list[dict[str, float]] | str] = {}
    try:
        certdir = workdir / "cert"
        certdir.mkdir()
        ensure_server_cert(str(certdir), LOOPBACK)
        base_settings: dict[str, Any] = {}
        _measure(
            "portunus",
            lambda: portunus(workdir, "p-default", base_settings),
            [stalled, oversized_frames],
            per,
        )
        unlimited = {
            **base_settings,
            "edge_preauth_max_connections": 2000,
            "edge_preauth_max_per_source": 2000,
        }
        _measure(
            "portunus-unlimited",
            lambda: portunus(workdir, "p-unlimited", unlimited),
            [stalled, oversized_frames],
            per,
        )
        try:
            before = extract_before(workdir)
            _measure(
                "portunus-before",
                lambda: portunus(workdir, "p-before", base_settings, before),
                [oversized_frames],
                per,
            )
        except (subprocess.CalledProcessError, StartError) as exc:
            per["portunus-before"] = f"cannot run the old code: {exc}"
        for name in ("haproxy", "nginx"):
            if name in settings.forwarders:
                _measure(name, lambda name=name: peer(name, workdir, certdir), [stalled], per)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return BenchResult(
        name="preauth_flood",
        title=f"Unauthenticated TLS flood: memory per {CONNS:,} hostile connections",
        method=(
            f"{CONNS:,} connections from 127.0.0.1 that never authenticate, against a TLS listener "
            "(Portunus' edge gateway: `portunus-server serve --shards 1`, the control process measured; "
            "haproxy `bind ssl crt`, nbthread 1; nginx stream `listen ssl`, one worker measured; one "
            "P-256 certificate for all). `stalled` = each connection sends a real TLS 1.3 ClientHello and "
            f"then nothing; RSS {SETTLE_SECS:g} s after the last connect minus RSS before; `held`/`refused` "
            "= connections the server still had open then / had closed. `oversized` (Portunus only) = "
            f"TLS, then a frame header announcing 16 MiB and up to 15 MiB of body, {OVERSIZED_CONCURRENCY} "
            "connections at a time until 1,000 were made; peak RSS during the flood minus RSS before, "
            "`kept` = what RSS stayed above the start once it settled. Each flood runs on a freshly "
            "started contender. `portunus` = default limits (128 "
            "anonymous connections, 16 per source); `portunus-unlimited` = both at 2,000 (every "
            f"connection admitted); `portunus-before` = commit {BEFORE[:7]}, before the limits. One "
            "measurement per contender."
        ),
        metrics=[
            Metric("stalled_mib", "stalled: growth per 1k MiB", False, 1),
            Metric("held", "stalled: held", False, 0),
            Metric("refused", "stalled: refused", True, 0),
            Metric("per_held_kib", "KiB per held conn", False, 1),
            Metric("oversized_mib", "oversized: peak growth MiB", False, 1),
            Metric("kept_mib", "oversized: kept MiB", False, 1),
            Metric("base_mib", "base RSS MiB", False, 1),
        ],
        per_forwarder=per,  # type: ignore[arg-type]
        seconds=time.monotonic() - started,
        notes=[
            "One source address (loopback): with the default limits Portunus admits 16 of the 1,000 "
            "and resets the rest at accept, before TLS; from many addresses at most 128 are admitted "
            "at once, each costing what `portunus-unlimited` shows per held connection.",
            "haproxy and nginx have no per-source or pre-handshake admission limit of their own "
            "beyond maxconn / worker_connections: they hold all 1,000 handshakes until their "
            "handshake timeout (60 s here).",
            "The oversized flood has no peer row: after the handshake a TLS terminator forwards the "
            "bytes to its backend rather than buffering a frame for itself.",
        ],
    )


def main() -> int:
    import json

    from bench.common import raise_nofile

    raise_nofile()
    result = run(Settings(log_dir=Path(tempfile.mkdtemp(prefix="ptn-bench-logs-"))))
    print(json.dumps(result.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
