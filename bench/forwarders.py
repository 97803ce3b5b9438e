"""The contenders: direct (no forwarder), Portunus, and the peers from bench/peers.

Each benchmark opens all of them at once, one listen port each, all pointing at the
same origin, so a round can visit them back to back. A contender that cannot start is
reported as a reason string instead of an Endpoint: its column reads "n/a (reason)".
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    LOOPBACK,
    PEERS_DIR,
    REPO,
    Service,
    StartError,
    free_port,
    http_ok,
    is_listening,
    start_service,
)

FORWARDERS = ("direct", "portunus", "haproxy", "nginx", "socat")
PEERS = ("haproxy", "nginx", "socat")
# Opt-in contenders (--forwarders): the same Portunus build with its native relay off,
# so one run shows both data paths side by side.
EXTRA = ("portunus-py", "portunus-loop")
# Their environment: the Python relay; the native relay driven from the shard's loop
# (PORTUNUS_NATIVE_THREAD=0) instead of its own thread.
EXTRA_ENV = {
    "portunus-py": {"PORTUNUS_NATIVE": "0"},
    "portunus-loop": {"PORTUNUS_NATIVE_THREAD": "0"},
}


@dataclass(frozen=True)
class Endpoint:
    """Where a load generator connects to reach the origin through ``name``."""

    name: str
    port: int
    service: Service | None = None
    host: str = LOOPBACK


def portunus_bin() -> str | None:
    """$PORTUNUS_BIN, else portunus-standalone on PATH, else the repo venv's or ours."""
    env = os.environ.get("PORTUNUS_BIN")
    if env:
        return env
    candidates = [
        shutil.which("portunus-standalone"),
        str(REPO / ".venv" / "bin" / "portunus-standalone"),
        str(Path(sys.executable).parent / "portunus-standalone"),
    ]
    for cand in candidates:
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def portunus_shards() -> int | None:
    """Shard count for throughput benches: $PORTUNUS_SHARDS, else Portunus' default."""
    value = os.environ.get("PORTUNUS_SHARDS")
    return int(value) if value else None


def portunus_toml(listen_port: int, target_port: int, metrics_port: int, udp: bool) -> str:
    """The standalone config (docs/reference/config.md) with one rule."""
    return (
        f'metrics_listen = "{LOOPBACK}:{metrics_port}"\n'
        f'listen_address = "{LOOPBACK}"\n'
        'log_format = "json"\n'
        "shutdown_drain_timeout_secs = 5\n"
        "\n[[rule]]\n"
        'name = "bench"\n'
        f'protocol = "{"udp" if udp else "tcp"}"\n'
        f"listen_port = {listen_port}\n"
        f'target = "{LOOPBACK}:{target_port}"\n'
    )


def start_portunus(
    target_port: int,
    log_dir: Path,
    udp: bool = False,
    shards: int | None = None,
    name: str = "portunus",
) -> Endpoint:
    binary = portunus_bin()
    if binary is None:
        raise StartError("portunus-standalone not found (set PORTUNUS_BIN or pip install -e .)")
    port, metrics = free_port(), free_port()
    config = log_dir / f"portunus-{port}.toml"
    config.write_text(portunus_toml(port, target_port, metrics, udp))
    argv = [binary, "--config", str(config)]
    if shards is not None:
        argv += ["--shards", str(shards)]
    url = f"http://{LOOPBACK}:{metrics}/metrics"
    svc = start_service(
        f"portunus-{port}",
        argv,
        log_dir,
        ready=lambda: is_listening(port, udp) and http_ok(url),
        timeout=20.0,
        env=EXTRA_ENV.get(name),
    )
    return Endpoint(name, port, svc)


def start_peer(name: str, target_port: int, log_dir: Path, udp: bool = False) -> Endpoint:
    run_peer = PEERS_DIR / "run-peer"
    if not os.access(run_peer, os.X_OK):
        raise StartError(f"{run_peer} missing")
    port = free_port()
    argv = [str(run_peer), name, str(port), f"{LOOPBACK}:{target_port}"]
    if udp:
        argv.append("--udp")
    svc = start_service(
        f"{name}-{port}",
        argv,
        log_dir,
        ready=lambda: is_listening(port, udp),
        env={"TMPDIR": str(log_dir)},
    )
    return Endpoint(name, port, svc)


def open_forwarders(
    started: list[Service],
    names: tuple[str, ...],
    target_port: int,
    log_dir: Path,
    udp: bool = False,
    shards: int | None = None,
) -> dict[str, Endpoint | str]:
    """Start every contender in ``names``; failures become reason strings.

    Started services are appended to ``started`` (a bench.common.services() scope) so
    they are stopped when the benchmark ends, even on an exception or Ctrl-C.
    """
    out: dict[str, Endpoint | str] = {}
    for name in names:
        try:
            if name == "direct":
                out[name] = Endpoint("direct", target_port)
                continue
            if name == "portunus" or name in EXTRA:
                ep = start_portunus(target_port, log_dir, udp, shards, name)
            elif name in PEERS:
                if udp and name == "haproxy":
                    raise StartError("haproxy does not forward UDP")
                ep = start_peer(name, target_port, log_dir, udp)
            else:
                raise StartError(f"unknown forwarder {name}")
        except StartError as exc:
            out[name] = str(exc)
            continue
        assert ep.service is not None
        started.append(ep.service)
        out[name] = ep
    return out
