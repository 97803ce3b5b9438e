"""Forwarder CPU per short connection: Portunus variants beside nginx stream and HAProxy.

On a shared two-core machine the short-connection *rate* moves with whatever else runs,
so this measures what a forwarder spends per connection: utime/stime of its whole
process tree across a wrk run (``-H 'Connection: close'``, one request per connection)
divided by the requests wrk completed.  Portunus runs once per variant, each variant a
set of environment variables (e.g. ``PORTUNUS_SPLICE_AFTER=0`` for the splice-from-the-
first-byte relay), all at the same time on their own ports; rounds visit every
contender back to back with a rotating start, and the report gives medians plus the
per-round ratio of each variant to the first one (paired, so machine drift cancels).

    python -m bench.cpu_per_conn --rounds 5 --duration 4 --size 1024 \\
        --variant splice=PORTUNUS_SPLICE_AFTER=0 --variant copy=PORTUNUS_SPLICE_AFTER=65536
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    LOOPBACK,
    Service,
    free_port,
    http_ok,
    is_listening,
    run_client,
    services,
    start_service,
    tool,
)
from bench.forwarders import portunus_bin, portunus_toml, start_peer
from bench.short_conn import CONNECTIONS, THREADS, parse_wrk

_TOTAL_KEY = "requests"


def start_origin(log_dir: Path, size: int) -> tuple[Service, int]:
    """nginx (1 worker) serving one static file of ``size`` bytes at /f."""
    port = free_port()
    work = log_dir / f"origin-{port}"
    (work / "www").mkdir(parents=True)
    (work / "www" / "f").write_bytes(b"x" * size)
    temp = "\n".join(f"  {k}_temp_path {work}/{k};" for k in ("client_body", "proxy"))
    (work / "nginx.conf").write_text(f"""worker_processes 1;
pid {work}/origin.pid;
error_log {work}/error.log;
daemon off;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  sendfile on;
{temp}
  server {{ listen {LOOPBACK}:{port} backlog=4096; root {work}/www; }}
}}
""")
    argv = [tool("nginx"), "-c", str(work / "nginx.conf"), "-p", str(work)]
    return start_service(f"origin-{port}", argv, log_dir, ready=lambda: is_listening(port)), port


def start_portunus_variant(
    name: str, env: dict[str, str], target: int, log_dir: Path
) -> tuple[Service, int]:
    binary = portunus_bin()
    if binary is None:
        raise SystemExit("portunus-standalone not found (set PORTUNUS_BIN)")
    port, metrics = free_port(), free_port()
    config = log_dir / f"portunus-{name}.toml"
    config.write_text(portunus_toml(port, target, metrics, udp=False))
    url = f"http://{LOOPBACK}:{metrics}/metrics"
    svc = start_service(
        f"portunus-{name}",
        [binary, "--config", str(config)],
        log_dir,
        ready=lambda: is_listening(port) and http_ok(url),
        timeout=20.0,
        env=env,
    )
    return svc, port


def cpu_seconds(svc: Service) -> tuple[float, float]:
    user = sys_ = 0.0
    for p in svc.processes():
        try:
            t = p.cpu_times()
        except Exception:  # noqa: BLE001 - a process that just exited
            continue
        user += t.user
        sys_ += t.system
    return user, sys_


def sample(svc: Service, port: int, seconds: int) -> dict[str, float]:
    u0, s0 = cpu_seconds(svc)
    out = run_client(
        [
            tool("wrk"),
            f"-t{THREADS}",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",
            "-H",
            "Connection: close",
            f"http://{LOOPBACK}:{port}/f",
        ],
        timeout=seconds + 30,
    )
    u1, s1 = cpu_seconds(svc)
    res = parse_wrk(out)
    total = float(out.split(" requests in")[0].split()[-1])
    return {
        "rps": res["rps"],
        "errors": res["errors"],
        _TOTAL_KEY: total,
        "user_us": (u1 - u0) * 1e6 / total,
        "sys_us": (s1 - s0) * 1e6 / total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024, help="response body bytes")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=VAR=VALUE[,VAR=VALUE] (Portunus environment); first is the baseline",
    )
    ap.add_argument("--peers", default="nginx,haproxy")
    args = ap.parse_args()
    variants: list[tuple[str, dict[str, str]]] = []
    for spec in args.variant or ["default="]:
        name, _, envs = spec.partition("=")
        env = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
        variants.append((name, env))
    log_dir = Path(tempfile.mkdtemp(prefix="cpu-per-conn-"))
    log_dir.chmod(0o755)  # nginx workers (nobody when run as root) read the body file
    with services() as started:
        origin, oport = start_origin(log_dir, args.size)
        started.append(origin)
        eps: dict[str, tuple[Service, int]] = {}
        for name, env in variants:
            eps[f"portunus:{name}"] = start_portunus_variant(name, env, oport, log_dir)
            started.append(eps[f"portunus:{name}"][0])
        for peer in [p for p in args.peers.split(",") if p]:
            ep = start_peer(peer, oport, log_dir)
            assert ep.service is not None
            started.append(ep.service)
            eps[peer] = (ep.service, ep.port)
        names = list(eps)
        per: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                svc, port = eps[n]
                per[n].append(sample(svc, port, args.duration))
            print(
                f"round {r + 1}: "
                + ", ".join(
                    f"{n} {per[n][-1]['rps']:.0f}/s {per[n][-1]['user_us'] + per[n][-1]['sys_us']:.1f}us"
                    for n in names
                ),
                flush=True,
            )
    base = names[0]
    refs = [base] + [r for r in ("nginx",) if r in per and r != base]

    def paired(n: str, ref: str, key: Callable[[dict[str, float]], float]) -> float:
        return statistics.median(key(a) / key(b) for a, b in zip(per[n], per[ref], strict=True))

    def total(s: dict[str, float]) -> float:
        return s["user_us"] + s["sys_us"]

    print(
        f"\nbody {args.size} B, wrk -t{THREADS} -c{CONNECTIONS} -d{args.duration}s, "
        f"{args.rounds} rounds, medians; ratios are medians of per-round (paired) ratios"
    )
    head = "".join(f" total ÷ {r} | rate ÷ {r} |" for r in refs)
    print(f"| forwarder | requests/s | user µs/conn | sys µs/conn | total µs/conn |{head} errors |")
    print("|---|---|---|---|---|" + "---|---|" * len(refs) + "---|")
    for n in names:
        med = {
            k: statistics.median(s[k] for s in per[n])
            for k in ("rps", "user_us", "sys_us", "errors")
        }
        cols = "".join(
            f" {paired(n, r, total):.2f} | {paired(n, r, lambda s: s['rps']):.2f} |" for r in refs
        )
        print(
            f"| {n} | {med['rps']:,.0f} | {med['user_us']:.1f} | {med['sys_us']:.1f} | "
            f"{statistics.median(total(s) for s in per[n]):.1f} |{cols} {med['errors']:.0f} |"
        )


if __name__ == "__main__":
    main()
