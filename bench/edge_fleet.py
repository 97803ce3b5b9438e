"""A fleet of fake edge clients in one process, for bench/edge_clients.py.

Each fake speaks the edge link protocol of docs/edge.md at the frame level and
nothing more: pinned TLS (``portunus.edge.pinning.open_pinned``), ``hello`` →
``welcome``, every ``sync``/``apply`` answered at once with ``applied`` (every
rule ``active``) and ``removed`` for removals, and the real client's cadence
(``portunus.edge.link.link_cadence``): with ``quiet`` (the default, like the
real client) the hello advertises ``quiet_link``, a ``ping`` goes out when
nothing else did for the welcome's ``heartbeat_secs`` and a ``stats`` frame only
when the counters changed (a fake's stay zero: once per session); without it a
``ping`` and a ``stats`` frame every heartbeat (5 s), as clients before
``quiet_link`` did.  Reconnects use the real client's jittered exponential
backoff (``portunus.edge.timing.Backoff``) and honour a ``busy`` refusal's
``retry_after`` the way the real client does (``portunus.edge.timing.busy_delay``).
No supervisor, no shards: the point is to load the *server* with many links cheaply.

The fleet runs in its own process (``Fleet``), so the harness that times RPC and
HTTP calls does not share a GIL with a thousand TLS connections.  The harness
talks to it over a ``multiprocessing`` pipe; times the fleet reports are
``time.monotonic()`` values, comparable across processes on Linux.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from portunus import __version__
from portunus.edge.enroll import EnrollError, parse_enroll_uri, redeem
from portunus.edge.link import QUIET_LINK, link_cadence
from portunus.edge.pinning import FingerprintMismatch, link_error, open_pinned
from portunus.edge.timing import Backoff, LinkTiming, busy_delay
from portunus.ipc import edge_messages
from portunus.ipc.edge_wire import CAPABILITIES, WireError, encode_frame, read_frame

_TIMING = LinkTiming()
_ZERO = {"bytes_in": 0, "bytes_out": 0, "connections_total": 0, "active_connections": 0}


class Revoked(Exception):
    """The server said ``error: revoked``: this fake stops for good."""


class Busy(Exception):
    """The server said ``error: busy`` with a ``retry_after``."""

    def __init__(self, retry_after: object) -> None:
        super().__init__("busy")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Identity:
    """What a bundle holds that the link needs."""

    client_id: str
    token: str


class FakeClient:
    """One simulated edge client: a reconnecting TLS link that acks everything."""

    __slots__ = (
        "ident",
        "host",
        "port",
        "fingerprint",
        "backoff",
        "rules",
        "connected",
        "sessions",
        "syncs",
        "synced_at",
        "sync_rules",
        "applies",
        "failures",
        "last_error",
        "task",
        "quiet",
        "busy",
        "last_tx",
    )

    def __init__(
        self, ident: Identity, host: str, port: int, fingerprint: str, quiet: bool = True
    ) -> None:
        self.ident = ident
        self.host = host
        self.port = port
        self.fingerprint = fingerprint
        self.backoff = Backoff(_TIMING.backoff_first, _TIMING.backoff_max)
        self.rules: set[str] = set()
        self.connected = False
        self.sessions = 0  # welcomes received
        self.syncs = 0  # sync frames answered
        self.synced_at = 0.0  # monotonic time the latest sync was answered
        self.sync_rules = 0  # rules in the latest sync
        self.applies = 0
        self.failures = 0
        self.last_error = ""
        self.task: asyncio.Task[None] | None = None
        self.quiet = quiet
        self.busy = 0  # busy refusals received
        self.last_tx = 0.0

    async def run(self) -> None:
        """Connect, serve, and reconnect after backoff until revoked or cancelled."""
        while True:
            delay = None
            try:
                await self._session()
            except Revoked:
                return
            except Busy as exc:
                self.busy += 1
                delay = busy_delay(exc.retry_after, self.backoff)
            except (
                OSError,
                TimeoutError,
                asyncio.IncompleteReadError,
                WireError,
                FingerprintMismatch,
            ) as exc:
                self.failures += 1
                self.last_error = link_error(exc)
            self.connected = False
            await asyncio.sleep(delay if delay is not None else self.backoff.next())

    async def _session(self) -> None:
        reader, writer = await open_pinned(
            self.host, self.port, self.fingerprint, _TIMING.connect_timeout
        )
        ticker: asyncio.Task[None] | None = None
        try:
            writer.write(
                encode_frame(
                    {
                        "type": "hello",
                        "token": self.ident.token,
                        "client_id": self.ident.client_id,
                        "version": __version__,
                        "capabilities": [*CAPABILITIES, QUIET_LINK]
                        if self.quiet
                        else list(CAPABILITIES),
                    }
                )
            )
            async with asyncio.timeout(_TIMING.handshake_timeout):
                welcome = await read_frame(reader)
            if welcome.get("type") == "error":
                if welcome.get("code") == "revoked":
                    raise Revoked()
                if welcome.get("code") == "busy":
                    raise Busy(welcome.get("retry_after"))
                raise WireError(f"refused: {welcome.get('code')}")
            if welcome.get("type") != "welcome":
                raise WireError(f"expected welcome, got {welcome.get('type')!r}")
            self.connected = True
            self.sessions += 1
            self.backoff.reset()
            try:  # the cadence fields, checked as the real client checks them
                typed = edge_messages.parse(welcome)
            except edge_messages.FrameInvalid as exc:
                raise WireError(str(exc)) from None
            if not isinstance(typed, edge_messages.Welcome):
                raise WireError(f"expected welcome, got {type(typed).__name__}")
            every, dead = link_cadence(typed, _TIMING)
            ticker = asyncio.create_task(
                self._ticker(writer, every) if not self.quiet else self._quiet_ticker(writer, every)
            )
            while True:
                async with asyncio.timeout(dead):
                    msg = await read_frame(reader)
                self._on_frame(writer, msg)
        finally:
            self.connected = False
            if ticker is not None:
                ticker.cancel()
            writer.transport.abort()

    async def _ticker(self, writer: asyncio.StreamWriter, every: float) -> None:
        # A random phase: real clients connect at different times, a fleet started in a
        # loop would otherwise ping in one burst.
        await asyncio.sleep(random.uniform(0, every))
        while not writer.transport.is_closing():
            stats = {"type": "stats", "rules": {rid: _ZERO for rid in self.rules}}
            writer.write(encode_frame({"type": "ping"}) + encode_frame(stats))
            await asyncio.sleep(every)

    async def _quiet_ticker(self, writer: asyncio.StreamWriter, every: float) -> None:
        """quiet_link: one stats frame (the counters never change), then a ping only
        when nothing else went out for ``every``."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.uniform(0, every))
        self._send(writer, {"type": "stats", "rules": {rid: _ZERO for rid in self.rules}})
        while not writer.transport.is_closing():
            wait = self.last_tx + every - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._send(writer, {"type": "ping"})

    def _send(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        writer.write(encode_frame(msg))
        self.last_tx = asyncio.get_running_loop().time()

    def _on_frame(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "sync":
            ids = [str(r.get("id")) for r in msg.get("rules") or [] if isinstance(r, dict)]
            self.rules = set(ids)
            self._send(
                writer,
                {
                    "type": "applied",
                    "seq": msg.get("seq"),
                    "results": {i: {"state": "active"} for i in ids},
                },
            )
            self.syncs += 1
            self.synced_at = time.monotonic()
            self.sync_rules = len(ids)
        elif kind == "apply":
            ids = [str(r.get("id")) for r in msg.get("upsert") or [] if isinstance(r, dict)]
            gone = [str(i) for i in msg.get("remove") or []]
            self.rules.update(ids)
            self.rules.difference_update(gone)
            out = encode_frame(
                {
                    "type": "applied",
                    "seq": msg.get("seq"),
                    "results": {i: {"state": "active"} for i in ids},
                }
            )
            if gone:
                out += encode_frame({"type": "removed", "ids": gone})
            writer.write(out)
            self.last_tx = asyncio.get_running_loop().time()
            self.applies += 1
        elif kind == "error" and msg.get("code") == "revoked":
            raise Revoked()
        # ping, renamed, unknown: nothing to answer

    def status(self) -> tuple[bool, int, int, float, int, int, str, int]:
        return (
            self.connected,
            self.sessions,
            self.syncs,
            self.synced_at,
            self.sync_rules,
            self.failures,
            self.last_error,
            self.busy,
        )


# ------------------------------------------------------------------ fleet process


async def _enroll_all(uris: list[str], concurrency: int) -> tuple[list[Identity | str], float]:
    """Redeem every URI with the real client code path; an entry is an Identity or
    the error text.  Returns them in order and the wall time."""
    sem = asyncio.Semaphore(concurrency)

    async def one(uri: str) -> Identity | str:
        backoff = Backoff(_TIMING.backoff_first, _TIMING.backoff_max)
        for _ in range(20):
            async with sem:
                try:
                    b = await redeem(parse_enroll_uri(uri))
                except EnrollError as exc:
                    if exc.code not in ("busy", "unavailable"):
                        return str(exc)
                    delay = busy_delay(exc.retry_after, backoff)
                except FingerprintMismatch as exc:
                    return str(exc)
                else:
                    return Identity(b.client_id, b.token)
            await asyncio.sleep(delay)
        return "gave up after 20 busy/unavailable answers"

    t0 = time.monotonic()
    out = await asyncio.gather(*(one(u) for u in uris))
    return list(out), time.monotonic() - t0


async def _serve(conn: multiprocessing.connection.Connection) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    def pump() -> None:
        # A blocking reader thread, not loop.add_reader: the loop would make the pipe
        # non-blocking and Connection.recv cannot resume a half-read message.
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = ("quit",)
            loop.call_soon_threadsafe(inbox.put_nowait, msg)
            if msg[0] == "quit":
                return

    threading.Thread(target=pump, name="fleet-inbox", daemon=True).start()
    fakes: dict[str, FakeClient] = {}
    while True:
        cmd, *args = await inbox.get()
        if cmd == "enroll":
            conn.send(await _enroll_all(*args))
        elif cmd == "connect":  # (host, port, fingerprint, [Identity], quiet)
            host, port, fp, idents, quiet = args
            for ident in idents:
                fake = FakeClient(ident, host, port, fp, quiet)
                fake.task = asyncio.create_task(fake.run())
                fakes[ident.client_id] = fake
            conn.send(len(fakes))
        elif cmd == "status":
            conn.send({cid: f.status() for cid, f in fakes.items()})
        elif cmd == "disconnect":
            tasks = [f.task for f in fakes.values() if f.task is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            fakes.clear()
            conn.send(0)
        elif cmd == "quit":
            with contextlib.suppress(OSError):
                conn.send(0)
            return


def fleet_main(conn: multiprocessing.connection.Connection) -> None:
    """Entry point of the fleet process."""
    import uvloop

    from bench.common import raise_nofile

    raise_nofile()
    uvloop.run(_serve(conn))


class Fleet:
    """The harness's handle on the fleet process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=fleet_main, args=(child,), name="edge-fleet", daemon=True)
        self.proc.start()
        child.close()

    def call(self, *msg: Any, timeout: float = 60.0) -> Any:
        self.conn.send(msg)
        if not self.conn.poll(timeout):
            raise RuntimeError(
                f"the fake-client fleet did not answer {msg[0]!r} within {timeout:g} s"
            )
        return self.conn.recv()

    def enroll(self, uris: list[str], concurrency: int) -> tuple[list[Identity | str], float]:
        return self.call("enroll", uris, concurrency, timeout=600.0)  # type: ignore[no-any-return]

    def connect(
        self, host: str, port: int, fingerprint: str, idents: list[Identity], quiet: bool = True
    ) -> None:
        self.call("connect", host, port, fingerprint, idents, quiet)

    def status(self) -> dict[str, tuple[bool, int, int, float, int, int, str, int]]:
        return self.call("status")  # type: ignore[no-any-return]

    def disconnect(self) -> None:
        self.call("disconnect", timeout=120.0)

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("quit", timeout=30.0)
            except (RuntimeError, OSError, EOFError):
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
