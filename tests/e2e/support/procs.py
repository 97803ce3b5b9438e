"""``ManagedProc``: a Portunus process tree under test, started in its own session
with its logs captured, torn down by killing the whole process group;
``ProcFactory``: what the fixtures that start such trees share."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Generic, TypeVar

import psutil

from .metrics import Metrics, scrape
from .polling import wait_for
from .ports import LOOPBACK, PortAllocator
from .secrets import WATCH

VENV_BIN = Path(sys.executable).parent
# systemd's hand-off variables: a process under test must not talk to the test runner's systemd.
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


# Data-plane switches the suite is run under on purpose (make test-python-relay runs the
# end-to-end tests with PORTUNUS_NATIVE=0): passed on to the processes under test.
_PASS_THROUGH = ("PORTUNUS_NATIVE", "PORTUNUS_SPLICE_AFTER")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without systemd's notify/watchdog variables and without any
    inherited ``PORTUNUS_*`` setting (a runtime dir, token, data dir or log format
    of the shell running the tests) except the relay switches in ``_PASS_THROUGH``,
    then ``extra``: what the test means to set."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SYSTEMD_VARS and (not k.startswith("PORTUNUS_") or k in _PASS_THROUGH)
    }
    env.update(extra or {})
    return env


def title_of(p: psutil.Process) -> str:
    return " ".join(p.cmdline()).strip()


def pipe_fds(pid: int) -> int:
    """How many pipe fds ``pid`` holds (the splice path keeps one pipe per direction)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                n += 1
    return n


class ManagedProc:
    """A Portunus process tree under test.

    Started in a new session (its own process group), so ``kill_tree`` reaches
    every descendant even if the root already died and they were re-parented.
    stderr (the JSON log) and stdout go to files under ``workdir``.  Subclasses
    say what ``wait_ready`` means for their program.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        workdir: Path,
        env: dict[str, str] | None = None,
        name: str = "proc",
        metrics_port: int | None = None,
    ) -> None:
        self.argv = argv
        self.workdir = workdir
        self.name = name
        self.metrics_port = metrics_port
        self.env = dict(env if env is not None else os.environ)
        self.stderr_path = workdir / f"{name}.stderr"
        self.stdout_path = workdir / f"{name}.stdout"
        self.proc: subprocess.Popen[bytes] | None = None
        self.known_pids: set[int] = set()

    # ---- lifecycle

    def start(self) -> None:
        with open(self.stderr_path, "ab") as err, open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.known_pids.add(self.proc.pid)
        WATCH.watch(self.stderr_path)
        WATCH.watch(self.stdout_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {timeout}s\n"
                + self.stderr_tail()
            ) from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the root and wait for it to exit; returns its exit code."""
        if not self.alive():
            assert self.proc is not None
            return self.proc.returncode
        self.send_signal(sig)
        return self.wait_exit(timeout)

    def kill_tree(self) -> None:
        """SIGKILL every process of the tree (process group + known descendants)."""
        if self.proc is None:
            return
        victims: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            victims = psutil.Process(self.proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.kill()
        for pid in self.known_pids - {self.proc.pid}:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE and title_of(p).startswith("portunus"):
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def wait_ready(self, timeout: float = 20.0) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not say when it is ready")

    def wait_supervisor_ready(self, shards: int, timeout: float, since: int = 0) -> None:
        """``supervisor.ready`` logged after record ``since`` and ``shards`` shard
        processes running under their titles: the first half of every ``wait_ready``."""
        self.wait_log("supervisor.ready", since=since, timeout=timeout)
        wait_for(
            lambda: len(self.shards()) == shards,
            timeout,
            what=lambda: f"{shards} shard process(es)\n" + self.stderr_tail(),
        )

    def cleanup(self) -> None:
        """Teardown whatever the test's outcome: kill the tree (subclasses also
        remove what they made outside ``workdir``)."""
        self.kill_tree()

    # ---- metrics

    @property
    def metrics_url(self) -> str:
        assert self.metrics_port is not None, f"{self.name} has no metrics_listen"
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def scrape(self) -> Metrics:
        return scrape(self.metrics_url)

    def wait_metrics(self, timeout: float) -> None:
        wait_for(
            lambda: self.scrape() is not None,
            timeout,
            what=lambda: f"{self.metrics_url} to answer\n" + self.stderr_tail(),
        )

    # ---- process tree

    def children(self) -> list[psutil.Process]:
        """Live direct children (zombies excluded)."""
        out: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            for c in psutil.Process(self.pid).children():
                with contextlib.suppress(psutil.Error):
                    if c.status() != psutil.STATUS_ZOMBIE:
                        out.append(c)
                        self.known_pids.add(c.pid)
        return out

    def titled(self) -> dict[str, psutil.Process]:
        """Direct children by process title (``portunus: shard 0`` -> process)."""
        out: dict[str, psutil.Process] = {}
        for c in self.children():
            with contextlib.suppress(psutil.Error):
                out[title_of(c)] = c
        return out

    def shards(self) -> dict[int, psutil.Process]:
        """Shard index -> process, from the ``portunus: shard N`` titles."""
        out: dict[int, psutil.Process] = {}
        for title, p in self.titled().items():
            if title.startswith("portunus: shard "):
                out[int(title.split()[-1])] = p
        return out

    def shard_rss(self) -> int:
        return sum(p.memory_info().rss for p in self.shards().values())

    # ---- logs

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_tail(self, lines: int = 40) -> str:
        tail = self.stderr_text().splitlines()[-lines:]
        return f"--- last {len(tail)} stderr lines of {self.name} ---\n" + "\n".join(tail)

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log record written so far, in order."""
        out: list[dict[str, Any]] = []
        for line in self.stderr_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def log_mark(self) -> int:
        return len(self.logs())

    def events(self, event: str, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.logs()[since:]
            if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
        ]

    def wait_log(
        self, event: str | tuple[str, ...], since: int = 0, timeout: float = 10.0, **fields: Any
    ) -> dict[str, Any]:
        """Wait for a log record with ``event`` (one of, if a tuple) written after
        record number ``since``; return it."""
        names = (event,) if isinstance(event, str) else event

        def found() -> dict[str, Any] | None:
            for r in self.logs()[since:]:
                if r.get("event") in names and all(r.get(k) == v for k, v in fields.items()):
                    return r
            if not self.alive():
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode if self.proc else '?'})"
                )
            return None

        return wait_for(
            found,
            timeout,
            what=lambda: f"log event {names} from {self.name}\n" + self.stderr_tail(),
        )


P = TypeVar("P", bound=ManagedProc)


class ProcFactory(Generic[P]):
    """Starts process trees under ``workdir`` with ports from ``ports`` and kills
    every one at ``close``, whatever the test's outcome; the stderr tail of any
    still running is printed first (pytest shows it when the test failed)."""

    def __init__(self, workdir: Path, ports: PortAllocator) -> None:
        self.workdir = workdir
        self.ports = ports
        self.procs: list[P] = []

    def launch(self, proc: P, *, start: bool = True, ready: bool = True) -> P:
        """Track ``proc`` for teardown, start it and wait until it is ready."""
        self.procs.append(proc)
        if start:
            proc.start()
            if ready:
                proc.wait_ready()
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                sys.stdout.write(proc.stderr_tail() + "\n")  # shown by pytest on failure
            proc.cleanup()
        self.procs.clear()
