"""A booted Debian 12 container for the install tests.

The host's PID 1 is not systemd, so the packages are installed into a clean
debootstrap'd Debian 12 root booted with ``systemd-nspawn --boot``: a real
systemd 252 as PID 1 (Type=notify, watchdog, sandboxing, sysusers), on its own
network namespace with nothing but loopback (``--private-network``).  The root is
built once (~40 s, ~430 MB) and cached under ``/var/cache/portunus-test``;
every boot is ``--ephemeral`` (a throw-away snapshot), so tests never see each
other's leftovers and the cache stays clean.

Commands run inside with ``nsenter -a`` into the container's PID 1, with a
clean environment, like an operator's root shell.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

CACHE = Path(os.environ.get("PORTUNUS_TEST_CACHE", "/var/cache/portunus-test"))
MIRROR = os.environ.get("PORTUNUS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# rpm: the .rpm's scriptlets run in the same kind of root (`rpm -ivh --nodeps`).
ROOT_PACKAGES = "systemd,systemd-sysv,dbus,python3.11,adduser,rpm"
GUEST_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb")


@dataclass(frozen=True)
class Packages:
    """The artifacts under test (see conftest.packages)."""

    dist: Path
    version: str
    deb: Path
    rpm: Path


def missing_tools(extra: tuple[str, ...] = ()) -> list[str]:
    return [t for t in (*HOST_TOOLS, *extra) if shutil.which(t) is None]


def root_dir() -> Path:
    """The cached root for the current package list (a new list, a new root)."""
    tag = hashlib.sha256(f"{SUITE} {ROOT_PACKAGES}".encode()).hexdigest()[:8]
    return CACHE / f"{SUITE}-{tag}"


def ensure_root() -> Path:
    """Return the cached root, running debootstrap first if it is not there.

    A lock file serialises concurrent runs; the root is built under a temporary
    name and renamed only once complete, so a killed debootstrap never leaves a
    half-built root that looks usable.
    """
    root = root_dir()
    stamp = root / ".portunus-test-root"
    if stamp.exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return root
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        log = CACHE / "debootstrap.log"
        with open(log, "w") as out:
            proc = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={ROOT_PACKAGES}",
                    SUITE,
                    str(tmp),
                    MIRROR,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=900,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"debootstrap failed (exit {proc.returncode}); see {log}")
        (tmp / ".portunus-test-root").write_text(f"{SUITE} {ROOT_PACKAGES} {MIRROR}\n")
        tmp.rename(root)
    return root


class Machine:
    """One ephemeral boot of the cached root; use as a context manager."""

    def __init__(self, root: Path, binds_ro: dict[str, str], log_path: Path) -> None:
        self.root = root
        self.binds_ro = binds_ro
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self._log = None

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Machine:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def boot(self, timeout: float = 90.0) -> None:
        cmd = [
            "systemd-nspawn",
            "-D",
            str(self.root),
            "--ephemeral",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--console=read-only",
        ]
        cmd += [f"--bind-ro={host}:{guest}" for host, guest in self.binds_ro.items()]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in shutdown()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"systemd-nspawn exited {self.proc.returncode}: {self.console()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"no container init after {timeout}s: {self.console()}")
            self.leader = self._find_init(self.proc.pid)
            time.sleep(0.05)
        # Wait for the boot to finish: until PID 1 answers on its bus, then for the
        # queued jobs (is-system-running --wait).
        state = ""
        while time.monotonic() < deadline:
            res = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.2)
        if state != "running":
            failed = self.run("systemctl", "--failed", "--no-pager", check=False).stdout
            raise RuntimeError(f"container booted to {state!r}, not 'running':\n{failed}")

    @staticmethod
    def _find_init(nspawn_pid: int) -> int:
        """The container's PID 1 as seen from the host: nspawn's child running systemd."""
        kids: list[int] = []
        for task in Path(f"/proc/{nspawn_pid}/task").glob("*/children"):
            try:
                kids += [int(p) for p in task.read_text().split()]
            except OSError:
                continue
        for pid in kids:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return pid
            except OSError:
                continue
        return 0

    def shutdown(self, timeout: float = 30.0) -> None:
        """Power off (nspawn turns SIGTERM into an orderly shutdown of the guest);
        SIGKILL the whole group if it hangs.  The ephemeral snapshot goes with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    # ------------------------------------------------------------- commands

    def run(
        self,
        *cmd: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container as root (or ``user`` via runuser)."""
        if user is not None:
            cmd = ("runuser", "-u", user, "--", *cmd)
        full = [
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            "env",
            "-i",
            GUEST_PATH,
            "LANG=C.UTF-8",
            "HOME=/root",
            *cmd,
        ]
        res = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(
                f"in container: {' '.join(cmd)} -> exit {res.returncode}\n"
                f"stdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}"
            )
        return res

    def sh(
        self, script: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, check=check, timeout=timeout)

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run(
            "sh",
            "-ec",
            f'mkdir -p "$(dirname {path})"; cat > {path}; chmod {mode} {path}',
            input=text,
        )

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    def stat(self, path: str) -> tuple[str, str, str]:
        """``(octal mode, owner, group)`` of path (not following a final symlink)."""
        out = self.run("stat", "-c", "%a %U %G", path).stdout.split()
        return out[0], out[1], out[2]

    def show(self, unit: str, *props: str) -> dict[str, str]:
        args = [f"--property={p}" for p in props]
        out = self.run("systemctl", "show", unit, *args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 60) -> str:
        return self.run(
            "journalctl", "-u", unit, "--no-pager", "-n", str(lines), "-o", "cat", check=False
        ).stdout

    def wait_for(self, what: str, probe, timeout: float = 20.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
        """Poll ``probe()`` until it returns something truthy; fail with ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)
