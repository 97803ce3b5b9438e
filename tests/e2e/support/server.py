"""``portunus-server serve`` under test, driven like an operator would: the CLI
(``cli``), the HTTP API (``http``) and the control socket (``rpc``)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from .polling import wait_for
from .ports import LOOPBACK, PortAllocator
from .procs import VENV_BIN, ManagedProc, ProcFactory, clean_env
from .secrets import WATCH
from .toml_writer import standalone_toml

# PORTUNUS_E2E_SERVER runs the server tests against another build of portunus-server.
SERVER_BIN = os.environ.get("PORTUNUS_E2E_SERVER") or str(VENV_BIN / "portunus-server")


class _Default:
    """Marker for "use the server's operator token" in ``ServerProc`` helpers."""

    def __repr__(self) -> str:
        return "OPERATOR_TOKEN"


OPERATOR_TOKEN: Any = _Default()


class ApiResponse:
    """One HTTP answer: ``status``, lower-cased ``headers``, raw ``body``; ``json()``
    parses it and ``error_code`` reads the contract's error envelope.

    It also unpacks (and indexes) as ``(status, parsed body or None)``, the shape
    the feature and edge tests use: ``status, body = srv.http(...)``.
    """

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str | None:
        try:
            doc = self.json()
        except ValueError:
            return None
        err = doc.get("error") if isinstance(doc, dict) else None
        return err.get("code") if isinstance(err, dict) else None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.status, self.json() if self.body else None))

    def __getitem__(self, index: int) -> Any:
        return tuple(self)[index]

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


class CliResult(subprocess.CompletedProcess[str]):
    """A finished CLI run; ``code``/``out``/``err`` name ``returncode``/``stdout``/
    ``stderr`` shorter and ``json`` parses stdout."""

    @property
    def code(self) -> int:
        return self.returncode

    @property
    def out(self) -> str:
        return self.stdout

    @property
    def err(self) -> str:
        return self.stderr

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


class ServerProc(ManagedProc):
    """``portunus-server --data-dir D serve --shards N`` with D/server.toml written
    for loopback: forwarded ports on 127.0.0.1, the API, metrics and edge gateway on
    free loopback ports, JSON logs, a short drain.

    The runtime dir (control.sock) is a short private directory under /tmp passed as
    ``PORTUNUS_RUNTIME_DIR`` (a pytest tmp path can exceed the 108-byte limit of a
    Unix socket path); ``cli`` passes the same environment, so the CLI finds it.
    ``start`` may be called again after ``stop`` (a restart keeps D and the ports);
    the stderr log is appended to, so ``log_mark`` separates the runs.
    """

    def __init__(
        self,
        *,
        workdir: Path,
        data_dir: Path,
        ports: PortAllocator,
        settings: dict[str, Any] | None = None,
        shards: int = 1,
        env: dict[str, str] | None = None,
        name: str = "server",
    ) -> None:
        self.data_dir = data_dir
        self.shard_count = shards
        self.api_port, metrics_port, self.control_port = ports.ports(3)
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="ptn-run-", dir="/tmp"))
        self.config_path = data_dir / "server.toml"
        self.settings: dict[str, Any] = {
            "listen_address": LOOPBACK,
            "operator_http_listen": f"{LOOPBACK}:{self.api_port}",
            "metrics_listen": f"{LOOPBACK}:{metrics_port}",
            "control_listen": f"{LOOPBACK}:{self.control_port}",
            "log_format": "json",
            "shutdown_drain_timeout_secs": 2,
        }
        self.settings.update(settings or {})
        full_env = clean_env({"PORTUNUS_RUNTIME_DIR": str(self.runtime_dir), **(env or {})})
        argv = [SERVER_BIN, "--data-dir", str(data_dir), "serve", "--shards", str(shards)]
        super().__init__(argv, workdir=workdir, env=full_env, name=name, metrics_port=metrics_port)
        self.start_mark = 0
        data_dir.mkdir(parents=True, exist_ok=True)
        self.write_config()

    # ---- files and addresses

    def write_config(self, settings: dict[str, Any] | None = None) -> None:
        """(Re)write D/server.toml; takes effect at the next start."""
        if settings is not None:
            self.settings.update(settings)
        self.config_path.write_text(standalone_toml(self.settings, []))

    @property
    def token(self) -> str:
        """The operator token ``serve`` wrote to D/operator.token on first start."""
        if isinstance(self.settings.get("operator_token"), str):
            token = str(self.settings["operator_token"])
        else:
            token = (self.data_dir / "operator.token").read_text().strip()
        WATCH.note(token)
        return token

    @property
    def db_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def socket_path(self) -> str:
        return str(self.runtime_dir / "control.sock")

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}"

    # ---- lifecycle

    def start(self) -> None:
        self.start_mark = self.log_mark()
        super().start()

    def health_ok(self) -> bool:
        """True when ``GET /v1/health`` answers 200 right now."""
        try:
            return self.http("GET", "/v1/health", token=None, timeout=2.0).status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Ready = ``supervisor.ready`` logged by this run, every shard running under
        its title, control and web running, and /v1/health answering 200."""
        self.wait_supervisor_ready(self.shard_count, timeout, since=self.start_mark)
        wait_for(
            lambda: self.child("control") and self.child("web"),
            timeout,
            what=lambda: "control and web processes\n" + self.stderr_tail(),
        )
        wait_for(self.health_ok, timeout, what=lambda: "/v1/health 200\n" + self.stderr_tail())

    def restart(self, timeout: float = 20.0) -> None:
        """SIGTERM, expect exit 0, start again on the same data dir and wait until ready."""
        rc = self.stop(signal.SIGTERM, timeout=timeout)
        assert rc == 0, f"serve exited {rc} on SIGTERM\n{self.stderr_tail()}"
        self.start()
        self.wait_ready(timeout)

    def child(self, name: str) -> psutil.Process | None:
        """The live child titled ``portunus: <name>`` (``control``, ``web``, ``shard 0``)."""
        return self.titled().get(f"portunus: {name}")

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # ---- talking to it

    def cli_env(self, token: Any = None, env: dict[str, str] | None = None) -> dict[str, str]:
        out = dict(self.env)
        out.pop("NOTIFY_SOCKET", None)
        if token is OPERATOR_TOKEN:
            token = self.token
        if token is not None:
            out["PORTUNUS_OPERATOR_TOKEN"] = token
        out.update(env or {})
        return out

    def cli(
        self,
        *args: str,
        token: Any = None,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
        data_dir: Path | None = None,
    ) -> CliResult:
        """``portunus-server --data-dir D ARGS...``; never raises on a non-zero exit.

        ``token=None`` sets no ``PORTUNUS_OPERATOR_TOKEN`` (the CLI then reads
        D/operator.token, as an operator would); a string or ``OPERATOR_TOKEN`` sets it.
        """
        argv = [SERVER_BIN, "--data-dir", str(data_dir or self.data_dir), *args]
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.cli_env(token, env),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
        )
        WATCH.harvest(res.stdout)
        WATCH.harvest(res.stderr)
        return CliResult(res.args, res.returncode, res.stdout, res.stderr)

    def cli_json(self, *args: str, token: Any = None, expect_rc: int = 0) -> Any:
        """``cli(*args, "--format", "json")``, asserting the exit code; the parsed stdout."""
        res = self.cli(*args, "--format", "json", token=token)
        assert res.returncode == expect_rc, (
            f"{args} exited {res.returncode}, wanted {expect_rc}\nstdout: {res.stdout}\nstderr: {res.stderr}"
        )
        return json.loads(res.stdout) if res.stdout.strip() else None

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: Any = OPERATOR_TOKEN,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 15.0,
    ) -> ApiResponse:
        """One request to the API; ``body`` is sent as JSON, ``raw`` as-is; ``token=None``
        sends no Authorization header."""
        hdrs = dict(headers or {})
        if token is OPERATOR_TOKEN:
            token = self.token
        if token is not None:
            hdrs.setdefault("Authorization", f"Bearer {token}")
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(LOOPBACK, self.api_port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            answer = ApiResponse(
                resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
            )
            WATCH.harvest(answer.body)
            return answer
        finally:
            conn.close()

    def rpc(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        token: Any = OPERATOR_TOKEN,
        timeout: float = 30.0,
    ) -> Any:
        """One control-socket request (``portunus.control.rpc.caller.call_sync``);
        raises ``PortunusError`` on an error reply."""
        from portunus.control.rpc.caller import call_sync

        if token is OPERATOR_TOKEN:
            token = self.token
        result = call_sync(self.socket_path, token, method, params or {}, timeout)
        WATCH.harvest(json.dumps(result, default=str))
        return result

    def rules(self) -> dict[int, dict[str, Any]]:
        """Rule id -> rule JSON of every rule (all pages), over the control socket."""
        out: dict[int, dict[str, Any]] = {}
        params: dict[str, Any] = {"limit": 1000}
        while True:
            got = self.rpc("rules.list", params)
            out.update((r["id"], r) for r in got["rules"])
            if not got.get("next_cursor"):
                return out
            params = {"limit": 1000, "cursor": got["next_cursor"]}

    def remove_rule(self, rule_id: int, timeout: float = 10.0) -> None:
        """Remove a rule and wait until its row is gone (its ports released)."""
        self.rpc("rules.remove", {"id": rule_id})
        wait_for(lambda: rule_id not in self.rules(), timeout, what=f"rule {rule_id} to be deleted")


class ServerFactory(ProcFactory[ServerProc]):
    """Starts ServerProcs under ``workdir`` (data dir ``workdir/<name>``); every
    tree is killed and its runtime dir removed at ``close``."""

    def __call__(
        self,
        *,
        shards: int = 1,
        settings: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        ready: bool = True,
        start: bool = True,
        data_dir: Path | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> ServerProc:
        """``wrap`` rewrites the argv (e.g. to run the server in a mount namespace)."""
        name = f"server{len(self.procs)}"
        proc = ServerProc(
            workdir=self.workdir,
            data_dir=data_dir or self.workdir / name,
            ports=self.ports,
            settings=settings,
            shards=shards,
            env=env,
            name=name,
        )
        if wrap is not None:
            proc.argv = wrap(proc.argv)
        return self.launch(proc, start=start, ready=ready)
