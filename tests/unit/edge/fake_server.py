"""A small fake of the server's edge gateway (docs/edge.md), for testing the client.

It speaks the real protocol over real TLS on 127.0.0.1 with a throwaway
self-signed certificate, but keeps its state in dicts and lets a test script
it: mint codes, push rules, revoke, rename, go silent (dead-link tests), and
read every frame each client sent.  ``FakeEdgeServer`` runs on the test's loop;
``ThreadedFakeServer`` runs one on a private loop in a thread for tests that
drive real client processes with blocking code.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import itertools
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from portunus.ipc.edge_wire import WireError, read_frame, write_frame

T = TypeVar("T")


def make_cert(directory: Path, name: str = "server") -> tuple[Path, Path, str]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1: (cert, key, fingerprint)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portunus-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    fp = "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return cert_path, key_path, fp


@dataclass
class FakeClient:
    client_id: str
    name: str
    token: str | None = None
    revoked: bool = False
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)  # desired set, by id
    frames: list[dict[str, Any]] = field(default_factory=list)  # every frame it sent (all sessions)
    hellos: list[dict[str, Any]] = field(default_factory=list)
    writer: asyncio.StreamWriter | None = None
    connects: int = 0


class FakeEdgeServer:
    def __init__(
        self, cert: Path, key: Path, fingerprint: str, heartbeat_secs: float = 5.0
    ) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.fingerprint = fingerprint
        self.heartbeat_secs = heartbeat_secs
        self.codes: dict[str, tuple[str, float]] = {}  # code -> (client_id, expires monotonic)
        self.used: set[str] = set()
        self.clients: dict[str, FakeClient] = {}
        self.silent = False  # stop pinging and answering: the client must call the link dead
        self.enroll_frames: list[dict[str, Any]] = []
        self.connections = 0  # TLS connections accepted (enroll or session)
        self._seq = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    # ------------------------------------------------------------ control

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", port, ssl=self.ctx)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every session (like a server shutting down)."""
        if self._server is not None:
            self._server.close()
        for c in self.clients.values():
            if c.writer is not None:
                c.writer.transport.abort()
                c.writer = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def uri(self, code: str, fingerprint: str | None = None) -> str:
        return f"portunus://127.0.0.1:{self.port}/enroll?code={code}&fp={fingerprint or self.fingerprint}"

    def mint(self, client_id: str, name: str, ttl: float = 600.0) -> str:
        code = f"code-{client_id}-{next(self._seq)}"
        self.clients.setdefault(client_id, FakeClient(client_id, name))
        self.codes[code] = (client_id, time.monotonic() + ttl)
        return code

    def add_client(self, client_id: str, name: str, token: str) -> FakeClient:
        c = FakeClient(client_id, name, token=token)
        self.clients[client_id] = c
        return c

    def connected(self, client_id: str) -> bool:
        c = self.clients.get(client_id)
        return c is not None and c.writer is not None

    async def push(
        self, client_id: str, upsert: list[dict[str, Any]] = (), remove: list[str] = ()
    ) -> int:  # type: ignore[assignment]
        """Store the change; send it when connected. Returns the seq (0 if not sent)."""
        c = self.clients[client_id]
        for rid in remove:
            c.rules.pop(str(rid), None)
        for r in upsert:
            c.rules[str(r["id"])] = r
        if c.writer is None:
            return 0
        seq = next(self._seq)
        await write_frame(
            c.writer, {"type": "apply", "seq": seq, "upsert": list(upsert), "remove": list(remove)}
        )
        return seq

    async def send(self, client_id: str, msg: dict[str, Any]) -> None:
        c = self.clients[client_id]
        assert c.writer is not None, f"{client_id} is not connected"
        await write_frame(c.writer, msg)

    async def revoke(self, client_id: str) -> None:
        c = self.clients[client_id]
        c.revoked = True
        if c.writer is not None:
            await write_frame(
                c.writer, {"type": "error", "code": "revoked", "message": "revoked by the operator"}
            )
            c.writer.close()
            c.writer = None

    async def wait(self, cond: Callable[[], T], timeout: float = 5.0) -> T:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = cond()
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("fake server: condition not met in time")
            await asyncio.sleep(0.01)

    def frames(self, client_id: str, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.clients[client_id].frames if f.get("type") == kind]

    # ------------------------------------------------------------ protocol

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.connections += 1
        try:
            first = await read_frame(reader)
            if first["type"] == "enroll":
                await self._enroll(first, writer)
            elif first["type"] == "hello":
                await self._session(first, reader, writer)
        except (OSError, asyncio.IncompleteReadError, WireError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.transport.abort()

    async def _enroll(self, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        self.enroll_frames.append(msg)
        code = msg.get("code")
        entry = self.codes.get(code) if isinstance(code, str) else None
        if entry is None or code in self.used or entry[1] < time.monotonic():
            why = (
                "unknown" if entry is None else ("already used" if code in self.used else "expired")
            )
            await write_frame(
                writer,
                {
                    "type": "error",
                    "code": "enrollment_invalid",
                    "message": f"enrollment code {why}",
                },
            )
            return
        self.used.add(code)  # type: ignore[arg-type]
        c = self.clients[entry[0]]
        c.token = f"token-{c.client_id}"
        await write_frame(
            writer,
            {"type": "enrolled", "client_id": c.client_id, "client_name": c.name, "token": c.token},
        )

    async def _session(
        self, hello: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        c = next(
            (x for x in self.clients.values() if x.token and x.token == hello.get("token")), None
        )
        if c is None or c.client_id != hello.get("client_id"):
            await write_frame(
                writer, {"type": "error", "code": "unauthenticated", "message": "bad token"}
            )
            return
        if c.revoked:
            await write_frame(
                writer, {"type": "error", "code": "revoked", "message": "revoked by the operator"}
            )
            return
        if c.writer is not None:
            c.writer.transport.abort()  # a newer session replaces an older one
        c.hellos.append(hello)
        await write_frame(
            writer,
            {
                "type": "welcome",
                "client_id": c.client_id,
                "client_name": c.name,
                "heartbeat_secs": self.heartbeat_secs,
            },
        )
        await write_frame(
            writer, {"type": "sync", "seq": next(self._seq), "rules": list(c.rules.values())}
        )
        c.writer = writer
        c.connects += 1
        pinger = asyncio.create_task(self._pinger(writer))
        try:
            while True:
                msg = await read_frame(reader)
                if not self.silent:
                    c.frames.append(msg)
        finally:
            pinger.cancel()
            if c.writer is writer:
                c.writer = None

    async def _pinger(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_secs)
            if not self.silent:
                await write_frame(writer, {"type": "ping"})


class ThreadedFakeServer:
    """A FakeEdgeServer on its own loop in a daemon thread; ``call`` runs a coroutine
    (or a plain function) there and returns its result."""

    def __init__(
        self, cert: Path, key: Path, fingerprint: str, heartbeat_secs: float = 5.0
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="fake-edge-server", daemon=True
        )
        self.thread.start()
        self.server: FakeEdgeServer = self.call_fn(
            lambda: FakeEdgeServer(cert, key, fingerprint, heartbeat_secs)
        )

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def call_fn(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        async def wrap() -> T:
            return fn()

        return self.call(wrap(), timeout)

    def close(self) -> None:
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def wire_rule(rid: str, port: int, target_port: int = 9, client: str = "edge-01") -> dict[str, Any]:
    """One TCP rule as the server sends it on the edge wire (unit and e2e edge tests)."""
    return {
        "id": rid,
        "client": client,
        "owner": "",
        "protocol": "tcp",
        "listen_start": port,
        "listen_end": port,
        "targets": [
            {
                "host": "127.0.0.1",
                "port": target_port,
                "port_end": None,
                "priority": 1,
                "proxy_protocol": None,
            }
        ],
        "sni": None,
        "proxy_protocol": None,
        "prefer_ipv6": False,
        "rate_limit": None,
        "health_check_interval_secs": 5.0,
    }
