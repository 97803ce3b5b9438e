"""The web listeners' limits (portunus.web.limits) on a real uvicorn server on
127.0.0.1: header size, body size, the request deadline, the connection cap;
and the largest legitimate body against MAX_BODY."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from portunus.schema.rule import MAX_TARGETS, RATE_LIMIT_ALL_KEYS
from portunus.web import openapi
from portunus.web.limits import MAX_HEADER_BYTES, BodyLimit, GuardedH11Protocol
from portunus.web.main import _config, _Server
from portunus.web.routes.bodies import MAX_BODY, check, read_body


def _most(props: dict[str, Any], key: str, unbounded: Any) -> Any:
    """The schema's maximum (length) for ``key``, else ``unbounded``."""
    prop = props[key]
    return prop.get("maximum", prop.get("maxLength", unbounded))


def largest_rule_body() -> dict[str, Any]:
    """A RuleBody with every field at the longest its schema allows."""
    rule = openapi.components()["RuleBody"]["properties"]
    target = openapi.components()["TargetBody"]["properties"]
    rate = openapi.components()["RateLimit"]["properties"]
    return {
        "client": "c" * rule["client"].get("maxLength", 64),
        "protocol": "tcp",
        "listen_port_start": 60000,
        "listen_port_end": 61023,
        "targets": [
            {
                "host": "h" * _most(target, "host", 255),
                "port_start": 50000,
                "port_end": 51023,
                "priority": _most(target, "priority", 10**15),
                "proxy_protocol": "v2",
            }
            for _ in range(MAX_TARGETS)
        ],
        "sni_pattern": None,
        "proxy_protocol": "v2",
        "prefer_ipv6": True,
        "rate_limit": {k: _most(rate, k, 10**15) for k in RATE_LIMIT_ALL_KEYS},
        "health_check_interval_secs": _most(rule, "health_check_interval_secs", 86400.125),
    }


def test_the_largest_legitimate_body_is_far_below_max_body() -> None:
    body = largest_rule_body()
    assert check(body, openapi.schema("RuleBody")) == []
    size = len(json.dumps(body, indent=2).encode())  # pretty-printed, as a person may send it
    assert size * 8 < MAX_BODY, size


# ------------------------------------------------------------ a real server


async def _echo_size(request: Request) -> JSONResponse:
    return JSONResponse({"bytes": len(await read_body(request))})


async def _slow(request: Request) -> JSONResponse:
    await asyncio.sleep(float(request.query_params.get("secs", "1")))
    return JSONResponse({"ok": True})


async def _plain(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def _app() -> Starlette:
    return Starlette(
        routes=[
            Route("/size", _echo_size, methods=["POST"]),
            Route("/slow", _slow),
            Route("/plain", _plain, methods=["GET", "POST"]),
        ],
        middleware=[Middleware(BodyLimit)],
    )


class _Fast(GuardedH11Protocol):
    request_timeout = 0.5
    max_connections = 3


@pytest.fixture
async def served() -> AsyncIterator[int]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    config = _config(_app())
    config.http = _Fast
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    await asyncio.wait_for(task, 10)
    sock.close()


async def _raw(port: int, data: bytes, wait: float = 3.0) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes; (answer, seconds taken)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(data)
    await writer.drain()
    out = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                out += chunk
    writer.close()
    return out, time.monotonic() - start


def _envelope(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


async def test_headers_over_the_limit_get_400_in_the_envelope(served: int) -> None:
    # Unfinished headers over MAX_HEADER_BYTES: refused without waiting for the rest.
    answer, took = await _raw(
        served, b"GET /plain HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * MAX_HEADER_BYTES
    )
    assert took < 0.4, took
    status, err = _envelope(answer)
    assert status == 400 and err["code"] == "bad_request", err
    ok, _ = await _raw(
        served,
        b"GET /plain HTTP/1.1\r\nHost: x\r\nX-Pad: "
        + b"a" * 8000
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert ok.startswith(b"HTTP/1.1 200"), ok[:80]


@pytest.mark.parametrize(
    "partial",
    [
        b"",  # connected, silent
        b"GET /plain HTTP/1.1\r\nHost: x\r\n",  # headers never finished
        b"POST /size HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",  # body never finished
    ],
)
async def test_an_incomplete_request_is_cut_at_the_deadline(served: int, partial: bytes) -> None:
    answer, took = await _raw(served, partial)
    assert 0.4 < took < 2.0, took
    status, err = _envelope(answer)
    assert status == 408 and err["code"] == "request_timeout", err


async def test_a_trickled_request_is_cut_at_the_deadline_too(served: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served)
    start = time.monotonic()
    got = bytearray()

    async def collect() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                got.extend(chunk)

    collecting = asyncio.create_task(collect())
    for byte in b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n":  # 3.4 s at one byte per 0.1 s
        if collecting.done():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.1)
    await asyncio.wait_for(collecting, 3)
    assert time.monotonic() - start < 1.5
    assert _envelope(bytes(got))[0] == 408
    writer.close()


async def test_deadline_is_per_request_and_not_on_the_response(served: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served}") as client:
        # The app takes longer than the deadline: the request was complete, so it is answered.
        assert (await client.get("/slow", params={"secs": "1"})).json() == {"ok": True}
        for _ in range(3):  # kept-alive requests each get their own clock
            await asyncio.sleep(0.3)
            assert (await client.get("/plain")).status_code == 200


async def test_bodies_over_max_body_get_413_on_every_route(served: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served}") as client:
        r = await client.post("/size", content=b"x" * MAX_BODY)
        assert r.json() == {"bytes": MAX_BODY}
        # Declared too large: refused before reading, even by a route that reads no body.
        r = await client.post("/plain", content=b"x" * (MAX_BODY + 1))
        assert r.status_code == 413 and r.json()["error"]["code"] == "validation.body_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
            for _ in range(MAX_BODY // 4096 + 2):
                yield b"y" * 4096

        r = await client.post("/size", content=chunks())
        assert r.status_code == 413 and r.json()["error"]["code"] == "validation.body_too_large"


async def test_at_the_cap_the_longest_waiting_connection_makes_room(served: int) -> None:
    """Connections without a complete request are reclaimed, oldest first: a new
    peer is served however many slow ones came before it."""
    held = [
        await asyncio.open_connection("127.0.0.1", served) for _ in range(_Fast.max_connections)
    ]
    await asyncio.sleep(0.05)
    ok, took = await _raw(served, b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200") and took < 0.3, (ok, took)
    # The oldest one was closed with 503 in the envelope, the others are still open.
    reader, _ = held[0]
    async with asyncio.timeout(1):
        answer = await reader.read()
    status, err = _envelope(answer)
    assert status == 503 and err["code"] == "unavailable", err
    for reader, _ in held[1:]:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await reader.read(1)
    for _, w in held:
        w.close()


async def test_connections_over_the_cap_get_503_at_once_when_all_are_busy(served: int) -> None:
    async def busy() -> bytes:
        answer, _ = await _raw(
            served, b"GET /slow?secs=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        return answer

    requests = [asyncio.create_task(busy()) for _ in range(_Fast.max_connections)]
    await asyncio.sleep(0.3)
    answer, took = await _raw(served, b"")
    assert took < 0.3, took
    status, err = _envelope(answer)
    assert status == 503 and err["code"] == "unavailable", err
    # The busy ones were not touched.
    for answer in await asyncio.gather(*requests):
        assert answer.startswith(b"HTTP/1.1 200"), answer
    ok, _ = await _raw(served, b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


def test_each_listener_gets_its_own_limits_from_the_settings() -> None:
    from portunus.config import Settings

    settings = Settings(http_request_timeout_secs=2.5, http_max_connections=7)
    api, metrics = _config(_app(), settings).http, _config(_app(), settings).http
    assert isinstance(api, type) and issubclass(api, GuardedH11Protocol)
    assert isinstance(metrics, type) and issubclass(metrics, GuardedH11Protocol)
    assert (api.request_timeout, api.max_connections) == (2.5, 7)
    # One registry of reclaimable connections per listener, not shared.
    assert api.waiting is not metrics.waiting and api.waiting is not GuardedH11Protocol.waiting
    default = _config(_app()).http
    assert isinstance(default, type) and issubclass(default, GuardedH11Protocol)
    assert (default.request_timeout, default.max_connections) == (10.0, 256)
