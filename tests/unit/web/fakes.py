"""A fake control process: newline-JSON on a Unix socket, recording every request."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from portunus.errors import PortunusError

TOKEN = "tok-secret-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

RULE = {
    "id": 7,
    "client": "local",
    "client_id": "c-local",
    "protocol": "tcp",
    "listen_port": 8080,
    "targets": [{"host": "127.0.0.1", "port": 9090, "priority": 1}],
    "sni_pattern": None,
    "proxy_protocol": None,
    "prefer_ipv6": False,
    "health_check_interval_secs": 5.0,
    "rate_limit": None,
    "owner": "",
    "state": "active",
    "failure_reason": None,
    "created_at": "2026-01-01T00:00:00Z",
}
STATS = {"id": 7, "bytes_in": 10, "bytes_out": 20, "connections_total": 3, "active_connections": 1}

Reply = Any  # a result, a PortunusError, raw bytes, or a callable(params) -> one of them


class FakeControl:
    """Records every request; answers from ``replies[method]`` (default: ``{}``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.replies: dict[str, Reply] = {"health": {"status": "ok"}}
        self.server: asyncio.AbstractServer | None = None

    def calls(self, method: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("method") == method]

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                req = json.loads(line)
                self.requests.append(req)
                reply = self.replies.get(req["method"], {})
                if callable(reply):
                    reply = reply(req["params"])
                if isinstance(reply, bytes):  # a broken control process
                    writer.write(reply)
                    await writer.drain()
                    continue
                if isinstance(reply, PortunusError):
                    body = {"id": req["id"], "error": reply.to_dict()}
                else:
                    body = {"id": req["id"], "result": reply}
                writer.write(json.dumps(body).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def paged_clients(clients: list[dict[str, Any]]) -> Any:
    """``clients.list`` as control answers it: ``local`` first then list order,
    filtered by ``connected``/``name_prefix``, ``limit`` rows after ``cursor``, and
    ``total`` counting every match."""

    def answer(params: dict[str, Any]) -> dict[str, Any]:
        match = [
            c
            for c in clients
            if params.get("connected") in (None, c.get("connected"))
            and c["client_name"].startswith(params.get("name_prefix", ""))
        ]
        start = 0
        if params.get("cursor"):
            ids = [c["client_id"] for c in match]
            after = params["cursor"].removeprefix("cur-")
            if after not in ids:
                return PortunusError("validation.cursor", "bad cursor")  # type: ignore[return-value]
            start = ids.index(after) + 1
        limit = params.get("limit", 100)
        shown = match[start : start + limit]
        more = len(match) > start + limit
        return {
            "clients": shown,
            "next_cursor": f"cur-{shown[-1]['client_id']}" if more else None,
            "total": len(match),
        }

    return answer


def client_by_ref(clients: list[dict[str, Any]]) -> Any:
    """``clients.get``: by id or name, else ``client_not_found``."""

    def answer(params: dict[str, Any]) -> Any:
        for c in clients:
            if params.get("id") in (c["client_id"], c["client_name"]):
                return c
        return PortunusError("client_not_found", f"no client {params.get('id')!r}")

    return answer
