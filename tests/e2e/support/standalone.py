"""``portunus-standalone`` under test: ``StandaloneProc`` writes its TOML and reloads
it; ``StandaloneFactory`` is the fixture's factory."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from .polling import wait_for
from .ports import LOOPBACK, listening_ports
from .procs import VENV_BIN, ManagedProc, ProcFactory, clean_env
from .toml_writer import standalone_toml

# PORTUNUS_E2E_STANDALONE runs the suite against another build (an installed package, a patched tree).
STANDALONE_BIN = os.environ.get("PORTUNUS_E2E_STANDALONE") or str(VENV_BIN / "portunus-standalone")


class StandaloneProc(ManagedProc):
    """``portunus-standalone --config F [--shards N]`` with its TOML written for it."""

    def __init__(
        self,
        *,
        workdir: Path,
        metrics_port: int,
        rules: list[dict[str, Any]],
        settings: dict[str, Any] | None = None,
        shards: int = 1,
        env: dict[str, str] | None = None,
        name: str = "standalone",
    ) -> None:
        self.config_path = workdir / f"{name}.toml"
        self.shard_count = shards
        self.settings: dict[str, Any] = {
            "listen_address": LOOPBACK,
            "metrics_listen": f"{LOOPBACK}:{metrics_port}",
            "log_format": "json",
            "shutdown_drain_timeout_secs": 5,
        }
        self.settings.update(settings or {})
        self.rules = list(rules)
        full_env = clean_env({"PORTUNUS_RUNTIME_DIR": str(workdir / f"{name}-run"), **(env or {})})
        argv = [STANDALONE_BIN, "--config", str(self.config_path), "--shards", str(shards)]
        super().__init__(argv, workdir=workdir, env=full_env, name=name, metrics_port=metrics_port)
        self.write_config()

    @property
    def metrics_dir(self) -> Path:
        """The PROMETHEUS_MULTIPROC_DIR the supervisor prepared."""
        return Path(self.env["PORTUNUS_RUNTIME_DIR"]) / "metrics"

    def write_config(
        self, rules: list[dict[str, Any]] | None = None, settings: dict[str, Any] | None = None
    ) -> None:
        if rules is not None:
            self.rules = list(rules)
        if settings is not None:
            self.settings.update(settings)
        self.write_raw(standalone_toml(self.settings, self.rules))

    def write_raw(self, text: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def rule_ports(self) -> list[int]:
        ports: list[int] = []
        for r in self.rules:
            if r.get("protocol", "tcp") != "tcp":
                continue
            if "listen_port" in r:
                ports.append(int(r["listen_port"]))
            elif "listen_ports" in r:
                lo, _, hi = str(r["listen_ports"]).partition("-")
                ports.extend(range(int(lo), int(hi or lo) + 1))
        return ports

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Ready = the supervisor logged ``supervisor.ready``, every shard runs under
        its title, /metrics answers and every TCP rule port is in LISTEN."""
        self.wait_supervisor_ready(self.shard_count, timeout)
        self.wait_metrics(timeout)
        for port in self.rule_ports():
            wait_for(lambda p=port: p in listening_ports(), timeout, what=f"port {port} in LISTEN")

    def reload(
        self, expect: str | tuple[str, ...] = "config.reloaded", timeout: float = 10.0
    ) -> dict[str, Any]:
        """SIGHUP and wait for the reload's outcome in the log (``config.reloaded``
        or ``config.invalid``); returns that record."""
        mark = self.log_mark()
        self.send_signal(signal.SIGHUP)
        outcome = ("config.reloaded", "config.invalid")
        rec = self.wait_log(outcome, since=mark, timeout=timeout)
        wanted = (expect,) if isinstance(expect, str) else expect
        assert rec["event"] in wanted, f"reload gave {rec}\n{self.stderr_tail()}"
        return rec


class StandaloneFactory(ProcFactory[StandaloneProc]):
    """Starts StandaloneProcs in ``workdir``; every tree is killed at ``close``."""

    def __call__(
        self,
        rules: list[dict[str, Any]],
        *,
        shards: int = 1,
        settings: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        splice: bool = True,
        ready: bool = True,
    ) -> StandaloneProc:
        extra_env = dict(env or {})
        if not splice:
            extra_env["PORTUNUS_NO_SPLICE"] = "1"
        return self.launch(
            StandaloneProc(
                workdir=self.workdir,
                metrics_port=self.ports.port(),
                rules=rules,
                settings=settings,
                shards=shards,
                env=extra_env,
                name=f"standalone{len(self.procs)}",
            ),
            ready=ready,
        )
