"""Hostile peers of the edge gateway that never authenticate (e2e tests and bench).

``Flood`` runs its own event loop in a background thread and keeps ``workers``
connections of each kind in flight, reconnecting as soon as one ends, until
``stop``:

- ``oversized``: TLS, then a frame header announcing ~16 MiB and up to
  ``body_bytes`` of body (what raised a control process to 677 MiB before the
  gateway bounded anonymous peers);
- ``slow_tls``: TCP, three bytes of a TLS record header, then silence (a
  handshake that never finishes);
- ``slow_frame``: TLS, then a frame header within the anonymous limit and a body
  that never arrives.

Each attempt ends as ``refused`` (reset or closed before the TLS handshake
finished), ``closed`` (the server closed it later) or ``error``; the counts are
in ``outcomes``.  Only loopback addresses are ever used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import threading
import time
from collections import Counter

KINDS = ("oversized", "slow_tls", "slow_frame")
_ANNOUNCED = 16 * 1024 * 1024 - 1
_CHUNK = b"\x00" * (256 * 1024)


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Flood:
    def __init__(
        self,
        host: str,
        port: int,
        workers: dict[str, int],
        *,
        body_bytes: int = 15 * 1024 * 1024,
        hold_secs: float = 30.0,
    ) -> None:
        unknown = set(workers) - set(KINDS)
        assert not unknown, unknown
        self.host, self.port = host, port
        self.workers = workers
        self.body_bytes = body_bytes
        self.hold_secs = hold_secs  # the most a connection waits for the server to close it
        self.outcomes: Counter[str] = Counter()
        self.attempts = 0
        self.open = 0
        self.peak_open = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tls = _client_tls()

    # ------------------------------------------------------------ control

    def start(self) -> Flood:
        # asyncio warns once per write into a socket the server reset: expected here.
        logging.getLogger("asyncio").setLevel(logging.ERROR)
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._main(),), daemon=True, name="flood"
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "the flood did not stop"

    def __enter__(self) -> Flood:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ the loop

    async def _main(self) -> None:
        tasks = [
            asyncio.create_task(self._worker(kind))
            for kind, n in self.workers.items()
            for _ in range(n)
        ]
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _worker(self, kind: str) -> None:
        attack = {
            "oversized": self._oversized,
            "slow_tls": self._slow_tls,
            "slow_frame": self._slow_frame,
        }[kind]
        while not self._stop.is_set():
            self.attempts += 1
            self.open += 1
            self.peak_open = max(self.peak_open, self.open)
            try:
                outcome = await attack()
            except asyncio.CancelledError:
                raise
            except (ConnectionError, OSError, ssl.SSLError, EOFError, TimeoutError):
                outcome = "refused"
            finally:
                self.open -= 1
            self.outcomes[f"{kind}.{outcome}"] += 1
            await asyncio.sleep(0)

    async def _until_closed(self, reader: asyncio.StreamReader) -> str:
        try:
            async with asyncio.timeout(self.hold_secs):
                while await reader.read(65536):
                    pass
        except TimeoutError:
            return "held"  # the server never closed it: a bound that does not hold
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        return "closed"

    async def _oversized(self) -> str:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self._tls, server_hostname=""
        )
        try:
            writer.write(struct.pack(">I", _ANNOUNCED))
            sent = 0
            try:
                while sent < self.body_bytes and not writer.transport.is_closing():
                    writer.write(_CHUNK)
                    sent += len(_CHUNK)
                    async with asyncio.timeout(self.hold_secs):
                        await writer.drain()
            except (ConnectionError, OSError, ssl.SSLError):
                return "closed"
            return await self._until_closed(reader)
        finally:
            writer.transport.abort()

    async def _slow_tls(self) -> str:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(b"\x16\x03\x01")  # a handshake record that never goes on
            await writer.drain()
            started = time.monotonic()
            outcome = await self._until_closed(reader)
            # A reset within a few ms is the refusal at accept, not the deadline.
            return "refused" if time.monotonic() - started < 0.05 else outcome
        finally:
            writer.transport.abort()

    async def _slow_frame(self) -> str:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self._tls, server_hostname=""
        )
        try:
            writer.write(struct.pack(">I", 4000) + b'{"type": "hel')
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
                await writer.drain()
            return await self._until_closed(reader)
        finally:
            writer.transport.abort()
