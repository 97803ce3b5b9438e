"""SNI-routed single-flow throughput vs the same forwarding without SNI (issue 5).

Target: "SNI-routed single-flow throughput ≥ 0.9 × the same rule without SNI (peek,
then zero-copy)".  One Portunus (standalone, default shards) holds both shapes at
once, so they run in the same process under the same conditions:

- ``portunus-plain``: two plain TCP rules on two ports (to the TLS sink, the raw sink);
- ``portunus`` (the SNI rule): two SNI rules sharing one port, exact names
  ``tls.bench.test`` → TLS sink and ``raw.bench.test`` → raw sink.

Peers route on the same two names from one port: HAProxy (``req.ssl_sni`` after
``tcp-request inspect-delay``) and nginx stream (``ssl_preread on`` + ``map``), with
run-peer's settings (threads/workers = CPUs, haproxy splice-auto).  run-peer has no
way to configure SNI routing, so their configs are written here.

Two flows are measured, each a single TCP connection through the forwarder:

- ``tls``: a real TLS 1.3 session (Python ``ssl``, ``server_hostname``) — handshake
  through the forwarder, then an N-byte stream of application data that the sink
  decrypts and drops; crypto costs the same in every arm, so the ratio is the point.
- ``hello+raw``: a real ClientHello (produced by Python ``ssl`` with the server name,
  captured from a MemoryBIO) followed by N bytes in the clear.  After the peek a
  forwarder only copies bytes, so this is the stricter test of "then zero-copy":
  without TLS' crypto on both ends the forwarder's own cost is most of the time.

Value = N bytes × 8 / (first payload byte sent → sink's count received), i.e. what
actually reached the sink.
"""

from __future__ import annotations

import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
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
from bench.forwarders import Endpoint, portunus_bin, portunus_shards
from bench.results import BenchResult, Metric, Settings
from bench.rounds import Sample, run_rounds

TLS_NAME, RAW_NAME = "tls.bench.test", "raw.bench.test"
CHUNK = 1 << 20
_LEN = struct.Struct("!Q")
# Bytes per measurement = duration × this: ~40 % of the duration for the fastest arm
# (direct: ~8 Gbit/s TLS, ~25-45 Gbit/s raw here), forwarders take longer.
BYTES_PER_SEC = {"tls": 0.4e9, "raw": 1.5e9}
SUBJECT = "portunus"  # the SNI rule is the subject of every ratio; plain is "portunus-plain"


# ------------------------------------------------------------------ clients


def client_hello(name: str) -> bytes:
    """The first flight of a real TLS client for ``name`` (one record)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _send_stream(send_all: object, n: int) -> None:
    payload = memoryview(bytes(CHUNK))
    send_all(_LEN.pack(n))  # type: ignore[operator]
    left = n
    while left:
        k = min(CHUNK, left)
        send_all(payload[:k])  # type: ignore[operator]
        left -= k


def _read_count(recv: object) -> int:
    data = b""
    while len(data) < 8:
        part = recv(8 - len(data))  # type: ignore[operator]
        if not part:
            raise RuntimeError("sink closed before answering (forwarder dropped the flow?)")
        data += part
    return int(_LEN.unpack(data)[0])


def tls_flow(port: int, n: int, timeout: float) -> float:
    """Gbit/s of one TLS session sending ``n`` bytes of application data."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=TLS_NAME) as tls:
            t0 = time.perf_counter()
            _send_stream(tls.sendall, n)
            got = _read_count(tls.recv)
            secs = time.perf_counter() - t0
    if got != n:
        raise RuntimeError(f"sink read {got} of {n} bytes")
    return n * 8 / secs / 1e9


def raw_flow(port: int, n: int, timeout: float) -> float:
    """Gbit/s of a real ClientHello followed by ``n`` raw bytes."""
    hello = client_hello(RAW_NAME)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(hello)
        t0 = time.perf_counter()
        _send_stream(s.sendall, n)
        got = _read_count(s.recv)
        secs = time.perf_counter() - t0
    if got != n:
        raise RuntimeError(f"sink read {got} of {n} bytes")
    return n * 8 / secs / 1e9


# ---------------------------------------------------------------- contenders


def make_cert(workdir: Path) -> tuple[Path, Path]:
    """A throwaway self-signed P-256 certificate for tls.bench.test."""
    cert, key = workdir / "sink-cert.pem", workdir / "sink-key.pem"
    argv = [
        tool("openssl"), "req", "-x509", "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", f"/CN={TLS_NAME}", "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise StartError(f"openssl req failed: {res.stderr.strip()[-300:]}")
    return cert, key


def start_sink(log_dir: Path) -> tuple[Service, int, int]:
    cert, key = make_cert(log_dir)
    tls_port, raw_port = free_port(), free_port()
    script = Path(__file__).with_name("tls_sink.py")
    argv = [sys.executable, str(script), str(tls_port), str(raw_port), str(cert), str(key)]
    svc = start_service(
        f"tls-sink-{tls_port}",
        argv,
        log_dir,
        ready=lambda: is_listening(tls_port) and is_listening(raw_port),
    )
    return svc, tls_port, raw_port


def portunus_sni_toml(ports: dict[str, int], sink: tuple[int, int], metrics: int) -> str:
    """Plain rules on ports["plain_tls"], ["plain_raw"]; two SNI rules on ports["sni"]."""
    tls, raw = sink
    rules = [
        ("plain-tls", ports["plain_tls"], tls, None),
        ("plain-raw", ports["plain_raw"], raw, None),
        ("sni-tls", ports["sni"], tls, TLS_NAME),
        ("sni-raw", ports["sni"], raw, RAW_NAME),
    ]
    out = (
        f'metrics_listen = "{LOOPBACK}:{metrics}"\n'
        f'listen_address = "{LOOPBACK}"\n'
        'log_format = "json"\n'
        "shutdown_drain_timeout_secs = 1\n"
    )
    for name, port, target, sni in rules:
        out += (
            f'\n[[rule]]\nname = "{name}"\nprotocol = "tcp"\nlisten_port = {port}\n'
            f'target = "{LOOPBACK}:{target}"\n'
        )
        if sni:
            out += f'sni = "{sni}"\n'
    return out


def start_portunus_sni(sink: tuple[int, int], log_dir: Path) -> tuple[Service, dict[str, int]]:
    binary = portunus_bin()
    if binary is None:
        raise StartError("portunus-standalone not found (set PORTUNUS_BIN or pip install -e .)")
    ports = {"plain_tls": free_port(), "plain_raw": free_port(), "sni": free_port()}
    metrics = free_port()
    config = log_dir / f"portunus-sni-{ports['sni']}.toml"
    config.write_text(portunus_sni_toml(ports, sink, metrics))
    argv = [binary, "--config", str(config)]
    if (shards := portunus_shards()) is not None:
        argv += ["--shards", str(shards)]
    url = f"http://{LOOPBACK}:{metrics}/metrics"
    svc = start_service(
        f"portunus-sni-{ports['sni']}",
        argv,
        log_dir,
        ready=lambda: all(is_listening(p) for p in ports.values()) and http_ok(url),
        timeout=20.0,
    )
    return svc, ports


def haproxy_sni_cfg(port: int, sink: tuple[int, int], cpus: int) -> str:
    """run-peer's haproxy settings, plus SNI routing on the two names."""
    tls, raw = sink
    return f"""global
  maxconn 4000
  nbthread {cpus}
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  option splice-auto
frontend f
  bind {LOOPBACK}:{port}
  tcp-request inspect-delay 5s
  tcp-request content accept if {{ req.ssl_hello_type 1 }}
  use_backend tls if {{ req.ssl_sni -i {TLS_NAME} }}
  use_backend raw if {{ req.ssl_sni -i {RAW_NAME} }}
backend tls
  server s {LOOPBACK}:{tls}
backend raw
  server s {LOOPBACK}:{raw}
"""


def nginx_sni_conf(port: int, sink: tuple[int, int], cpus: int, workdir: Path) -> str:
    """run-peer's nginx settings, plus ssl_preread and a map on the server name."""
    tls, raw = sink
    return f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes {cpus}; pid {workdir}/n.pid; error_log {workdir}/err.log; daemon off;
worker_rlimit_nofile 20000;
events {{ worker_connections 8000; }}
stream {{
  map $ssl_preread_server_name $sni_upstream {{
    {TLS_NAME} {LOOPBACK}:{tls};
    {RAW_NAME} {LOOPBACK}:{raw};
  }}
  server {{
    listen {LOOPBACK}:{port} reuseport backlog=4096;
    ssl_preread on;
    proxy_pass $sni_upstream;
  }}
}}
"""


def start_peer_sni(name: str, sink: tuple[int, int], log_dir: Path) -> tuple[Service, int]:
    port = free_port()
    workdir = log_dir / f"{name}-sni-{port}"
    workdir.mkdir()
    cpus = os.cpu_count() or 1
    if name == "haproxy":
        cfg = workdir / "h.cfg"
        cfg.write_text(haproxy_sni_cfg(port, sink, cpus))
        argv = [tool("haproxy"), "-db", "-f", str(cfg)]
    else:
        cfg = workdir / "n.conf"
        cfg.write_text(nginx_sni_conf(port, sink, cpus, workdir))
        argv = [tool("nginx"), "-c", str(cfg), "-p", str(workdir)]
    svc = start_service(f"{name}-sni-{port}", argv, log_dir, ready=lambda: is_listening(port))
    return svc, port


Contenders = dict[str, tuple[int, int, Service | None] | str]


def open_contenders(
    started: list[Service], names: tuple[str, ...], sink: tuple[int, int], log_dir: Path
) -> Contenders:
    """{name: (port for the TLS flow, port for the raw flow, service) or reason}."""
    out: Contenders = {}
    for name in names:
        try:
            if name == "direct":
                out[name] = (sink[0], sink[1], None)
            elif name == "portunus":
                svc, ports = start_portunus_sni(sink, log_dir)
                started.append(svc)
                out["portunus"] = (ports["sni"], ports["sni"], svc)
                out["portunus-plain"] = (ports["plain_tls"], ports["plain_raw"], svc)
            elif name in ("haproxy", "nginx"):
                svc, port = start_peer_sni(name, sink, log_dir)
                started.append(svc)
                out[name] = (port, port, svc)
            # socat cannot route on a server name: not a contender here.
        except StartError as exc:
            out[name] = str(exc)
    return out


def endpoints(cont: Contenders, flow: str) -> dict[str, Endpoint | str]:
    idx = 0 if flow == "tls" else 1
    return {
        name: c if isinstance(c, str) else Endpoint(name, c[idx], c[2]) for name, c in cont.items()
    }


def measure(flow: str, n: int, timeout: float) -> Callable[[Endpoint], Sample]:
    fn = tls_flow if flow == "tls" else raw_flow

    def one(ep: Endpoint) -> Sample:
        return {"gbps": fn(ep.port, n, timeout)}

    return one


def paired_note(per: dict[str, list[Sample] | str]) -> list[str]:
    """SNI ÷ plain within each round (they run back to back), a drift-robust view."""
    sni, plain = per.get(SUBJECT), per.get("portunus-plain")
    if not isinstance(sni, list) or not isinstance(plain, list) or len(sni) != len(plain):
        return []
    pairs = sorted(a["gbps"] / b["gbps"] for a, b in zip(sni, plain, strict=True))
    return [
        "SNI ÷ plain paired per round (same round, back to back): median "
        f"{statistics.median(pairs):.2f}×, range {pairs[0]:.2f}× – {pairs[-1]:.2f}× "
        f"over {len(pairs)} rounds."
    ]


def run(settings: Settings) -> list[BenchResult]:
    """Both flows, every contender, ``settings.rounds`` interleaved rounds each."""
    sizes = {f: int(settings.duration * BYTES_PER_SEC[f]) for f in ("tls", "raw")}
    out: list[BenchResult] = []
    with services() as started:
        sink_svc, tls_port, raw_port = start_sink(settings.log_dir)
        started.append(sink_svc)
        cont = open_contenders(started, settings.forwarders, (tls_port, raw_port), settings.log_dir)
        for flow in ("tls", "raw"):
            n = sizes[flow]
            label = f"sni_{flow}"
            per = run_rounds(
                label, endpoints(cont, flow), settings.rounds,
                measure(flow, n, timeout=settings.duration * 10 + 30),
            )  # fmt: skip
            what = (
                f"a real TLS 1.3 session (Python ssl, server_hostname={TLS_NAME}) "
                f"sending {n / 1e9:.1f} GB of application data to a Python TLS sink "
                "that decrypts and drops it"
                if flow == "tls"
                else f"a real ClientHello for {RAW_NAME} (Python ssl via MemoryBIO) "
                f"then {n / 1e9:.1f} GB in the clear to a Python sink that drops it"
            )
            out.append(
                BenchResult(
                    name=label,
                    title=(
                        "SNI-routed single-flow throughput, "
                        + ("real TLS" if flow == "tls" else "ClientHello + raw bytes")
                    ),
                    method=(
                        f"one TCP connection: {what}; Gbit/s = bytes × 8 / (first payload "
                        "byte sent → sink's byte count received). `portunus` = the SNI rule "
                        "(two exact-name SNI rules share its port), `portunus-plain` = the "
                        "same target as a plain TCP rule in the same Portunus process; "
                        "haproxy (req.ssl_sni) and nginx (ssl_preread + map) route the same "
                        "two names on one port. See bench/sni.py."
                    ),
                    metrics=[Metric("gbps", "Gbit/s", True)],
                    per_forwarder=per,
                    notes=paired_note(per),
                    extra={"bytes": n},
                )
            )
    return out
