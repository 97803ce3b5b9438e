"""An echo origin that says who it is: ``python bench/tag_echo.py PORT TAG``.

Each reply is TAG (one byte) followed by the bytes received, so the failover
benchmark's client knows whether the primary or the backup served a connection.
"""

from __future__ import annotations

import asyncio
import signal
import sys


class TagEcho(asyncio.Protocol):
    __slots__ = ("transport", "tag")

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self.tag + data)


async def serve(port: int, tag: bytes) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    server = await loop.create_server(
        lambda: TagEcho(tag), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    async with server:
        await stop


def main() -> None:
    port, tag = int(sys.argv[1]), sys.argv[2].encode()[:1]
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port, tag))
    else:
        uvloop.run(serve(port, tag))


if __name__ == "__main__":
    main()
