"""Real ``portunus-client`` processes for the edge end-to-end tests.

``ClientProc`` runs ``portunus-client --bundle B --data-dir D --listen-address
127.0.0.1 --metrics-listen 127.0.0.1:<own port> --shards N``; ``enroll`` runs the
``enroll`` verb.  ``ClientFactory`` kills every tree it started at teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.support import (
    LOOPBACK,
    VENV_BIN,
    ManagedProc,
    Metrics,
    PortAllocator,
    scrape,
    wait_for,
)

CLIENT_BIN = os.environ.get("PORTUNUS_E2E_CLIENT") or str(VENV_BIN / "portunus-client")


def enroll(uri: str, out: Path, *extra: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLIENT_BIN, "enroll", uri, "--out", str(out), *extra], capture_output=True,
                          text=True, timeout=timeout, check=False)


class ClientProc(ManagedProc):
    def __init__(self, *, workdir: Path, bundle: Path, metrics_port: int, shards: int = 1,
                 extra: list[str] | None = None, name: str = "client", data_dir: Path | None = None) -> None:
        self.bundle = bundle
        self.data_dir = data_dir or workdir / f"{name}-data"
        self.metrics_port = metrics_port
        self.shard_count = shards
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "PORTUNUS_RUNTIME_DIR")}
        argv = [CLIENT_BIN, "--bundle", str(bundle), "--data-dir", str(self.data_dir),
                "--listen-address", LOOPBACK, "--metrics-listen", f"{LOOPBACK}:{metrics_port}",
                "--shards", str(shards), *(extra or [])]
        super().__init__(argv, workdir=workdir, env=env, name=name)

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def scrape(self) -> Metrics:
        return scrape(self.metrics_url)

    def cached_rules(self) -> list[dict[str, Any]]:
        try:
            return list(json.loads((self.data_dir / "rules.json").read_text())["rules"])
        except FileNotFoundError:
            return []

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Supervisor ready (the cached rules are applied), shards up, /metrics answers."""
        self.wait_log("supervisor.ready", timeout=timeout)
        wait_for(lambda: len(self.shards()) == self.shard_count, timeout,
                 what=lambda: f"{self.shard_count} shard(s)\n" + self.stderr_tail())
        wait_for(lambda: self.scrape() is not None, timeout,
                 what=lambda: f"{self.metrics_url} to answer\n" + self.stderr_tail())

    def wait_connected(self, since: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_log("link.connected", since=since, timeout=timeout)


class ClientFactory:
    def __init__(self, workdir: Path, ports: PortAllocator) -> None:
        self.workdir = workdir
        self.ports = ports
        self.procs: list[ClientProc] = []

    def __call__(self, bundle: Path, *, shards: int = 1, extra: list[str] | None = None,
                 name: str | None = None, ready: bool = True, data_dir: Path | None = None) -> ClientProc:
        """Start a client; ``data_dir`` reuses another's (a restart of the same edge)."""
        proc = ClientProc(workdir=self.workdir, bundle=bundle, metrics_port=self.ports.port(), shards=shards,
                          extra=extra, name=name or f"client{len(self.procs)}", data_dir=data_dir)
        self.procs.append(proc)
        proc.start()
        if ready:
            proc.wait_ready()
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                sys.stdout.write(proc.stderr_tail() + "\n")
            proc.kill_tree()
        self.procs.clear()
