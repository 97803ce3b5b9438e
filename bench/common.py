"""Process management, ports and machine facts shared by every benchmark.

Every process a benchmark starts goes through :func:`start_service`, which puts it in
its own session (so a Ctrl-C on the terminal reaches the harness only, and the harness
stops the children in order), logs its output to a file, and registers it for the
last-resort cleanup that runs at interpreter exit. Services stop with SIGTERM to the
leader, then SIGKILL to the whole process group and any stray descendant.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = Path(os.environ.get("PORTUNUS_PEERS_DIR", str(REPO / "bench" / "peers")))
# Spawned servers hold 10k+ sockets in the idle-connection benchmark (two per
# forwarded connection); root may raise the hard limit, anyone else gets the old one.
CHILD_NOFILE = 65536
# Listen ports come from below the ephemeral range so the tens of thousands of
# outgoing connections a benchmark makes can never collide with a listener.
_PORT_RANGE = (20000, 32000)
_used_ports: set[int] = set()
_live: dict[int, Service] = {}


class StartError(RuntimeError):
    """A service did not become ready; the message carries the reason for the report."""


def raise_nofile(limit: int = CHILD_NOFILE) -> None:
    """Raise RLIMIT_NOFILE as far as allowed; runs in the harness and in children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(limit, soft), max(limit, hard)))
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1, unique within this run."""
    for _ in range(500):
        port = random.randrange(*_PORT_RANGE)
        if port in _used_ports:
            continue
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind((LOOPBACK, port))
        except OSError:
            continue
        _used_ports.add(port)
        return port
    raise RuntimeError(f"no free port found in {_PORT_RANGE[0]}-{_PORT_RANGE[1]}")


def _proc_net_ports(files: Sequence[str], state: str | None) -> set[int]:
    ports: set[int] = set()
    for name in files:
        try:
            lines = Path("/proc/net", name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if state is None or fields[3] == state:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def is_listening(port: int, udp: bool = False) -> bool:
    """True once something listens on ``port``; looks at /proc so it sends no traffic.

    Probing with a real connection would be forwarded to the origin (an iperf3 server
    counts a bogus control connection as a failed test), so readiness never connects.
    """
    if udp:
        return port in _proc_net_ports(("udp", "udp6"), None)
    return port in _proc_net_ports(("tcp", "tcp6"), "0A")


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when ``url`` answers 200 (used for the Portunus metrics endpoint)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _child_setup() -> None:
    raise_nofile()


class Service:
    """One started process tree (a peer, an origin, or Portunus)."""

    __slots__ = ("name", "proc", "log_path")

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def processes(self) -> list[psutil.Process]:
        """The leader and all its descendants (nginx workers, Portunus shards)."""
        try:
            leader = psutil.Process(self.proc.pid)
            return [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, grace: float = 8.0) -> None:
        """SIGTERM the leader, wait ``grace`` s, then SIGKILL the group and strays."""
        _live.pop(self.proc.pid, None)
        tree = self.processes()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored SIGTERM for {grace:.0f}s; killing", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def start_service(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    ready: Callable[[], bool],
    timeout: float = 15.0,
    env: dict[str, str] | None = None,
) -> Service:
    """Start ``argv`` and wait until ``ready()``; raise StartError with the log tail.

    The process gets its own session: the terminal's SIGINT reaches only the harness,
    which then stops services in reverse start order.
    """
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup,  # noqa: PLW1509 - only setrlimit, no locks
            env={**os.environ, **(env or {})},
        )
    svc = Service(name, proc, log_path)
    _live[proc.pid] = svc
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            svc.stop()
            raise StartError(
                f"{name} exited with {proc.returncode}: {svc.log_tail() or 'no output'}"
            )
        if ready():
            return svc
        if time.monotonic() > deadline:
            tail = svc.log_tail()
            svc.stop()
            raise StartError(f"{name} not ready after {timeout:.0f}s: {tail or 'no output'}")
        time.sleep(0.05)


def stop_all() -> None:
    """Last-resort cleanup (atexit / fatal signal): stop whatever is still running."""
    for svc in list(_live.values())[::-1]:
        svc.stop(grace=3.0)


atexit.register(stop_all)


@contextlib.contextmanager
def services() -> Iterator[list[Service]]:
    """A scope whose services are stopped in reverse order when it exits, however."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for svc in reversed(started):
            svc.stop()


def wait_for(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def usable_cpus(cpus: set[int]) -> set[int]:
    """``cpus`` limited to CPUs this machine has; all of them if none is left."""
    have = os.sched_getaffinity(0)
    return (cpus & have) or have


def pin(svc: Service, cpus: set[int]) -> None:
    """Bind every thread of a running service to ``cpus``.

    On two cores, where the scheduler happens to place client, forwarder and origin
    decides a round trip (same-core wakeups ~4 us, cross-core ~12 us here), which made
    unpinned latency runs bimodal. Per thread, because haproxy runs nbthread threads;
    later forks and threads inherit the mask.
    """
    cpus = usable_cpus(cpus)
    for proc in svc.processes():
        try:
            tids = [t.id for t in proc.threads()]
        except psutil.NoSuchProcess:
            continue
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus)


def run_client(
    argv: Sequence[str],
    timeout: float,
    ok_codes: tuple[int, ...] = (0,),
    cpus: set[int] | None = None,
) -> str:
    """Run a load generator to completion; stdout on success, RuntimeError otherwise."""
    try:
        res = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            preexec_fn=(lambda: os.sched_setaffinity(0, usable_cpus(cpus))) if cpus else None,  # noqa: PLW1509
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
    if res.returncode not in ok_codes:
        detail = (res.stderr.strip() or res.stdout.strip())[-400:]
        raise RuntimeError(f"{argv[0]} exited {res.returncode}: {detail}")
    return res.stdout


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise StartError(f"{name} not installed (run {PEERS_DIR / 'install'})")
    return path


def _first_line(argv: Sequence[str]) -> str:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    out = (res.stdout + res.stderr).strip().splitlines()
    return out[0].strip() if out else "unknown"


def machine_info() -> dict[str, object]:
    """The facts a reader needs to judge the numbers: CPUs, kernel, tools, commit."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "commit": commit,
        "tools": {
            "haproxy": _first_line(["haproxy", "-v"]),
            "nginx": _first_line(["nginx", "-v"]),
            "socat": _socat_version(),
            "iperf3": _first_line(["iperf3", "--version"]),
            "wrk": _first_line(["wrk", "--version"]),
            "sockperf": _first_line(["sockperf", "--version"]),
        },
    }


def _socat_version() -> str:
    try:
        out = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    for line in out.splitlines():
        if line.startswith("socat version"):
            return line.strip()
    return "unknown"
