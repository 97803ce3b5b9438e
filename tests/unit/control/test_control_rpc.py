"""The control RPC end to end in one process: real socket, real store, fake data plane."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from typing import Any

import pytest

from portunus.control.rpc.protocol import MAX_REQUEST_BYTES
from portunus.control.store import bootstrap_superadmin
from portunus.errors import PortunusError

from .conftest import expect_error


async def raw_exchange(path: str, data: bytes, read_until_eof: bool = True) -> list[dict[str, Any]]:
    """Send raw bytes, return every reply line until the server closes."""
    reader, writer = await asyncio.open_unix_connection(path, limit=4 * MAX_REQUEST_BYTES)
    try:
        writer.write(data)
        try:
            await writer.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = (
            await asyncio.wait_for(reader.read(), 10) if read_until_eof else await reader.readline()
        )
    finally:
        writer.close()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


# ---------------------------------------------------------------- protocol


async def test_socket_mode_and_health_without_token(harness: Any) -> None:
    st = os.stat(harness.settings.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o660
    assert await harness.client.call("health", token="") == {"status": "ok"}


async def test_stale_socket_file_is_replaced(harness: Any) -> None:
    # A second server on the same path (the first "died" without cleaning up).
    from portunus.control.rpc.server import RpcServer

    async def dispatch(req: Any) -> Any:
        return {"second": True}

    second = RpcServer(harness.settings.socket_path, dispatch)
    await second.start()
    try:
        assert await harness.call("health") == {"second": True}
    finally:
        await second.close()


async def test_whoami_and_unauthenticated(harness: Any) -> None:
    who = await harness.call("auth.whoami")
    assert who["user"] == "operator" and who["role"] == "superadmin" and who["token_id"] >= 1
    await expect_error(harness.client.call("auth.whoami", token=""), "unauthenticated")
    await expect_error(harness.client.call("rules.list", token="wrong"), "unauthenticated")
    other = bootstrap_superadmin(harness.settings.db_path, "dana")
    assert (await harness.call("auth.whoami", token=other))["user"] == "dana"


async def test_unknown_method_keeps_connection(harness: Any) -> None:
    data = (
        json.dumps({"id": 1, "token": "x", "method": "rules.explode"})
        + "\n"
        + json.dumps({"id": 2, "method": "health"})
        + "\n"
    ).encode()
    reader, writer = await asyncio.open_unix_connection(harness.settings.socket_path)
    writer.write(data)
    first = json.loads(await reader.readline())
    second = json.loads(await reader.readline())
    writer.close()
    assert first["id"] == 1 and first["error"]["code"] == "not_found"
    assert "rules.push" in first["error"]["message"]
    assert second == {"id": 2, "result": {"status": "ok"}}


@pytest.mark.parametrize("garbage", [b"this is not json\n", b"[1, 2, 3]\n", b"\xff\xfe\n", b"42\n"])
async def test_garbage_gets_bad_request_and_close(harness: Any, garbage: bytes) -> None:
    replies = await raw_exchange(
        harness.settings.socket_path, garbage + b'{"id": 9, "method": "health"}\n'
    )
    assert len(replies) == 1  # the health request after the garbage is never served
    assert replies[0]["error"]["code"] == "bad_request"
    assert await harness.call("health") == {"status": "ok"}  # the server lives on


async def test_bad_fields_are_answered_not_fatal(harness: Any) -> None:
    data = b'{"id": 3, "method": "health", "params": [1]}\n{"id": 4, "method": "health"}\n'
    reader, writer = await asyncio.open_unix_connection(harness.settings.socket_path)
    writer.write(data)
    first = json.loads(await reader.readline())
    second = json.loads(await reader.readline())
    writer.close()
    assert first["id"] == 3 and first["error"]["code"] == "bad_request"
    assert second["result"] == {"status": "ok"}


async def test_oversize_request_is_refused_and_closed(harness: Any) -> None:
    replies = await raw_exchange(harness.settings.socket_path, b"x" * (MAX_REQUEST_BYTES + 1))
    assert len(replies) == 1 and replies[0]["error"]["code"] == "bad_request"
    assert "exceeds" in replies[0]["error"]["message"]


async def test_request_of_exactly_the_limit_is_served(harness: Any) -> None:
    req = {"id": 5, "method": "health", "params": {}}
    line = json.dumps(req).encode()
    padded = line[:-1] + b" " * (MAX_REQUEST_BYTES - len(line)) + b"}"
    assert len(padded) == MAX_REQUEST_BYTES
    replies = await raw_exchange(harness.settings.socket_path, padded + b"\n", read_until_eof=False)
    assert replies == [{"id": 5, "result": {"status": "ok"}}]


async def test_idle_connection_is_closed(make_harness: Any) -> None:
    h = await make_harness(idle_timeout=0.2)
    reader, writer = await asyncio.open_unix_connection(h.settings.socket_path)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    reply = json.loads(raw)
    assert reply["id"] is None and reply["error"]["code"] == "bad_request"
    assert "idle" in reply["error"]["message"]


async def test_internal_error_is_answered_and_logged(
    harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any) -> Any:
        raise ZeroDivisionError

    monkeypatch.setattr(harness.service, "list_rules", broken)
    await expect_error(harness.call("rules.list"), "internal")
    assert await harness.call("health") == {"status": "ok"}


async def test_server_close_removes_socket(harness: Any) -> None:
    await harness.server.close()
    assert not os.path.exists(harness.settings.socket_path)
    with pytest.raises(PortunusError) as info:
        await harness.call("health")
    assert info.value.code == "unavailable"


def test_socket_path_is_not_a_socket_is_refused(tmp_path: Any) -> None:
    from portunus.control.rpc.server import remove_stale_socket

    p = tmp_path / "control.sock"
    p.write_text("precious")
    with pytest.raises(PortunusError):
        remove_stale_socket(str(p))
    assert p.read_text() == "precious"
    s = socket.socket(socket.AF_UNIX)
    p2 = tmp_path / "s"
    s.bind(str(p2))
    s.close()
    remove_stale_socket(str(p2))
    assert not p2.exists()


def test_audit_time_forms_match_the_cli() -> None:
    from datetime import UTC, datetime, timedelta

    from portunus.control.rpc.handlers import parse_time

    assert parse_time("2024-05-01T12:00:00Z", "since") == "2024-05-01T12:00:00.000Z"
    assert parse_time("2024-05-01T14:00:00+02:00", "since") == "2024-05-01T12:00:00.000Z"
    assert parse_time("2024-05-01", "since") == "2024-05-01T00:00:00.000Z"
    assert parse_time(0, "since") == "1970-01-01T00:00:00.000Z"
    for age, secs in (("90s", 90), ("1h30m", 5400), ("1w", 604800), ("now", 0)):
        got = datetime.fromisoformat(parse_time(age, "since"))
        assert abs((datetime.now(UTC) - timedelta(seconds=secs) - got).total_seconds()) < 5
    for bad in ("soon", "", "1x", 10**20, True, None):
        with pytest.raises(PortunusError) as info:
            parse_time(bad, "until")
        assert info.value.code == "validation.until"
