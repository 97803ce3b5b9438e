"""Real ``portunus-client`` processes for the edge end-to-end tests.

``ClientProc`` runs ``portunus-client --bundle B --data-dir D --listen-address
127.0.0.1 --metrics-listen 127.0.0.1:<own port> --shards N``, each client with its
own data dir; ``enroll`` runs the ``enroll`` verb.  ``ClientFactory`` kills every
tree it started at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.e2e.support import LOOPBACK, VENV_BIN, WATCH, ManagedProc, ProcFactory, clean_env

CLIENT_BIN = os.environ.get("PORTUNUS_E2E_CLIENT") or str(VENV_BIN / "portunus-client")


def enroll(
    uri: str, out: Path, *extra: str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    WATCH.harvest(uri)
    res = subprocess.run(
        [CLIENT_BIN, "enroll", uri, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    with contextlib.suppress(OSError):
        WATCH.harvest(out.read_text())  # the bundle: the client token
    return res


class ClientProc(ManagedProc):
    def __init__(
        self,
        *,
        workdir: Path,
        bundle: Path,
        metrics_port: int,
        shards: int = 1,
        extra: list[str] | None = None,
        name: str = "client",
        data_dir: Path | None = None,
    ) -> None:
        self.bundle = bundle
        with contextlib.suppress(OSError):
            WATCH.harvest(bundle.read_text())
        self.data_dir = data_dir or workdir / f"{name}-data"
        self.shard_count = shards
        argv = [
            CLIENT_BIN,
            "--bundle",
            str(bundle),
            "--data-dir",
            str(self.data_dir),
            "--listen-address",
            LOOPBACK,
            "--metrics-listen",
            f"{LOOPBACK}:{metrics_port}",
            "--shards",
            str(shards),
            *(extra or []),
        ]
        super().__init__(
            argv, workdir=workdir, env=clean_env(), name=name, metrics_port=metrics_port
        )

    def cached_rules(self) -> list[dict[str, Any]]:
        try:
            return list(json.loads((self.data_dir / "rules.json").read_text())["rules"])
        except FileNotFoundError:
            return []

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Supervisor ready (the cached rules are applied), shards up, /metrics answers."""
        self.wait_supervisor_ready(self.shard_count, timeout)
        self.wait_metrics(timeout)

    def wait_connected(self, since: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_log("link.connected", since=since, timeout=timeout)


class ClientFactory(ProcFactory[ClientProc]):
    def __call__(
        self,
        bundle: Path,
        *,
        shards: int = 1,
        extra: list[str] | None = None,
        name: str | None = None,
        ready: bool = True,
        data_dir: Path | None = None,
    ) -> ClientProc:
        """Start a client; ``data_dir`` reuses another's (a restart of the same edge)."""
        return self.launch(
            ClientProc(
                workdir=self.workdir,
                bundle=bundle,
                metrics_port=self.ports.port(),
                shards=shards,
                extra=extra,
                name=name or f"client{len(self.procs)}",
                data_dir=data_dir,
            ),
            ready=ready,
        )
