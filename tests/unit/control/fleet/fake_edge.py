"""A fake edge client of the gateway (TLS with the pinned fingerprint, frames
collected by a reader task) and the parts of an enrollment URI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from portunus.ipc.edge_wire import encode_frame, read_frame

ALL_CAPS = ["tcp", "udp", "range", "sni", "proxy_protocol", "dns", "failover", "rate_limit"]


class FakeEdge:
    """A client of the gateway: TLS with the fingerprint pinned (like the real
    client), frames collected by a reader task, optional automatic answers."""

    def __init__(self, port: int, fingerprint: str | None = None) -> None:
        self.port = port
        self.fingerprint = fingerprint
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.seen: list[dict[str, Any]] = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.peer_fingerprint: str | None = None
        self.closed = asyncio.Event()
        # None = the test answers; else (state, reason) for every upserted/synced rule.
        self.auto: tuple[str, str | None] | None = None
        self.auto_remove = True
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # pinned by fingerprint below, not by a CA
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=ctx)
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        self.peer_fingerprint = "sha256:" + hashlib.sha256(der).hexdigest()
        if self.fingerprint is not None and self.peer_fingerprint != self.fingerprint:
            await self.close()
            raise AssertionError(
                f"fingerprint mismatch: {self.peer_fingerprint} != {self.fingerprint}"
            )
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.reader is not None
        try:
            while True:
                msg = await read_frame(self.reader)
                self.seen.append(msg)
                if self.auto is not None and msg["type"] in ("apply", "sync"):
                    rules = msg.get("upsert", msg.get("rules", []))
                    state, reason = self.auto
                    await self.send(
                        {
                            "type": "applied",
                            "seq": msg["seq"],
                            "results": {r["id"]: {"state": state, "reason": reason} for r in rules},
                        }
                    )
                if self.auto_remove and msg["type"] == "apply" and msg.get("remove"):
                    await self.send({"type": "removed", "ids": msg["remove"]})
                await self.frames.put(msg)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            self.closed.set()

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.write(encode_frame(msg))
        await self.writer.drain()

    async def recv(self, kind: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame (of ``kind``, skipping pings and others)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no {kind or 'frame'} within {timeout} s; seen {self.seen}")
            try:
                msg = await asyncio.wait_for(self.frames.get(), left)
            except TimeoutError:
                continue
            if kind is None or msg["type"] == kind:
                return msg

    async def enroll(self, code: str) -> dict[str, Any]:
        await self.connect()
        await self.send({"type": "enroll", "code": code, "version": "0.1.0"})
        return await self.recv()

    async def hello(
        self,
        token: str,
        client_id: str | None,
        caps: list[str] | None = None,
        version: str = "0.1.0",
    ) -> dict[str, Any]:
        await self.connect()
        msg: dict[str, Any] = {
            "type": "hello",
            "token": token,
            "version": version,
            "capabilities": ALL_CAPS if caps is None else caps,
        }
        if client_id is not None:
            msg["client_id"] = client_id
        await self.send(msg)
        return await self.recv()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
                await self.writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def uri_parts(uri: str) -> tuple[str, int, str, str]:
    """``(host, port, code, fp)`` of an enrollment URI."""
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    assert parts.scheme == "portunus" and parts.path == "/enroll", uri
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port, query["code"][0], query["fp"][0]
