"""control.sock's group: no chown when it is already right (the packaged unit, where
chown is filtered), and a failing chown is a warning, never a failed start."""

from __future__ import annotations

import grp
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from portunus.control.rpc import server as rpc_server


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    path = str(tmp_path / "control.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    return path


def _group_is(monkeypatch: pytest.MonkeyPatch, gid: int) -> None:
    monkeypatch.setattr(
        rpc_server.grp, "getgrnam", lambda name: grp.struct_group((name, "x", gid, []))
    )


def test_no_chown_when_the_group_already_matches(
    sock_path: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    _group_is(monkeypatch, os.stat(sock_path).st_gid)
    calls: list[Any] = []
    monkeypatch.setattr(rpc_server.os, "chown", lambda *a: calls.append(a))
    rpc_server._set_owner_group(sock_path)
    assert calls == []
    assert "control.socket_group" not in capfd.readouterr().err


def test_eperm_is_a_warning(
    sock_path: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    _group_is(monkeypatch, os.stat(sock_path).st_gid + 1)
    calls: list[Any] = []

    def denied(*args: Any) -> None:
        calls.append(args)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(rpc_server.os, "chown", denied)
    rpc_server._set_owner_group(sock_path)  # must not raise
    assert calls == [(sock_path, -1, os.stat(sock_path).st_gid + 1)]
    lines = [json.loads(ln) for ln in capfd.readouterr().err.splitlines() if "socket_group" in ln]
    assert len(lines) == 1 and lines[0]["level"] == "warning", lines
    assert lines[0]["error"] == "Operation not permitted" and lines[0]["path"] == sock_path


async def test_server_starts_when_chown_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "run" / "control.sock")
    _group_is(monkeypatch, os.getgid() + 12345)

    def denied(*args: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(rpc_server.os, "chown", denied)

    async def dispatch(req: Any) -> Any:
        return {"ok": True}

    srv = rpc_server.RpcServer(path, dispatch)
    await srv.start()
    try:
        assert os.stat(path).st_mode & 0o777 == rpc_server.SOCKET_MODE
    finally:
        await srv.close()
