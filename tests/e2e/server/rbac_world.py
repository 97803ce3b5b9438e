"""A running server with users for the RBAC end-to-end tests.

``World`` holds: ``root`` (superadmin with a password, made with ``user-add
--role superadmin --password-stdin``), ``alice`` (user with a grant on
``local`` tcp), ``bob`` (user without any grant) and ``carol`` (another user
with her own grant), an API token for each, and helpers that make fresh
resources (rules, users, tokens, grants, clients) owned by whoever a test says.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

from portunus.errors import PortunusError
from tests.e2e.support import PortAllocator, ServerProc
from tests.e2e.support.server import SERVER_BIN, CliResult

PASSWORD = "correct horse battery staple"
GRANT_PORTS = 128  # enough for every row of the matrix (each case makes a fresh rule)


def cli_stdin(srv: ServerProc, *args: str, stdin: str, token: Any = None) -> CliResult:
    """``portunus-server ARGS`` with ``stdin`` (for ``--password-stdin``)."""
    argv = [SERVER_BIN, "--data-dir", str(srv.data_dir), *args]
    res = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        env=srv.cli_env(token),
        cwd=srv.workdir,
    )
    return CliResult(res.args, res.returncode, res.stdout, res.stderr)


@dataclass
class World:
    srv: ServerProc
    ports: PortAllocator
    tokens: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    _next: dict[str, itertools.count[int]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def rpc(self, method: str, params: dict[str, Any] | None = None, who: str = "root") -> Any:
        return self.srv.rpc(method, params or {}, token=self.tokens[who])

    def port_of(self, owner: str) -> int:
        """A fresh listen port inside ``owner``'s grant (root: outside every grant)."""
        lo, hi = self.ranges[owner]
        port = lo + next(self._next.setdefault(owner, itertools.count()))
        assert port <= hi, f"grant range of {owner} exhausted"
        return port

    def unique(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    # ---- fresh resources, made by root over the control socket

    def rule(self, owner: str) -> int:
        body = {
            "client": "local",
            "listen_port": self.port_of(owner),
            "targets": [{"host": "127.0.0.1", "port": 9}],
        }
        if owner != "root":
            body["owner"] = owner
        return int(self.rpc("rules.push", body)["id"])

    def user(self) -> str:
        user_id = self.unique("temp")
        self.rpc("users.add", {"user_id": user_id, "password": PASSWORD})
        return user_id

    def token_of(self, owner: str) -> int:
        return int(self.rpc("tokens.issue", {"user_id": owner, "name": "matrix"})["token_id"])

    def grant_for(self, owner: str) -> int:
        # A port no rule uses: revoking this grant removes nothing.
        lo = self.port_of("root")
        return int(
            self.rpc(
                "grants.add",
                {
                    "user_id": owner,
                    "client": "local",
                    "listen_port_start": lo,
                    "listen_port_end": lo,
                },
            )["grant_id"]
        )

    def client(self, revoked: bool = False) -> str:
        name = self.unique("edge")
        made = self.rpc("clients.enroll", {"name": name, "address": "127.0.0.1"})
        if revoked:
            self.rpc("clients.revoke", {"id": made["client_id"]})
        return str(made["client_id"])


def make_world(srv: ServerProc, ports: PortAllocator) -> World:
    world = World(srv, ports)
    res = cli_stdin(
        srv,
        "user-add",
        "root",
        "--role",
        "superadmin",
        "--password-stdin",
        "--format",
        "json",
        stdin=PASSWORD + "\n",
    )
    assert res.code == 0, res.err
    assert json.loads(res.out)["role"] == "superadmin" and "temporary_password" not in res.out
    world.tokens["operator"] = srv.token
    world.tokens["root"] = srv.rpc("tokens.issue", {"user_id": "root"})["token"]
    for name in ("alice", "bob", "carol"):
        srv.rpc("users.add", {"user_id": name, "password": PASSWORD})
        world.tokens[name] = srv.rpc("tokens.issue", {"user_id": name})["token"]
    for name in ("alice", "carol", "root"):
        lo = ports.block(GRANT_PORTS)
        world.ranges[name] = (lo, lo + GRANT_PORTS - 1)
        if name != "root":
            srv.rpc(
                "grants.add",
                {
                    "user_id": name,
                    "client": "local",
                    "listen_port_start": lo,
                    "listen_port_end": lo + GRANT_PORTS - 1,
                    "protocols": ["tcp"],
                },
            )
    return world


def expect_rpc_error(call: Any, code: str) -> PortunusError:
    try:
        call()
    except PortunusError as exc:
        assert exc.code == code, exc.to_dict()
        return exc
    raise AssertionError(f"expected {code}")
