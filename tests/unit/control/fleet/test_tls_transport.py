"""The gateway's TLS transport over a non-blocking SSLSocket (control.fleet.tls_transport).

Every test runs a real TLS client (asyncio's, as the edge client) against the
transport on 127.0.0.1, under uvloop (the control process's loop) and under the
stdlib loop, with ``asyncio.StreamReaderProtocol``/``StreamWriter`` on top as the
gateway uses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from portunus.control.fleet.cert import ServerCert, generate
from portunus.control.fleet.tls_transport import HIGH_WATER, start_tls_server
from portunus.edge.pinning import client_context

Runner = Callable[[Coroutine[Any, Any, Any]], Any]
RUNNERS = [pytest.param(uvloop.run, id="uvloop"), pytest.param(asyncio.run, id="asyncio")]


@pytest.fixture(scope="module")
def server_ctx(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    d: Path = tmp_path_factory.mktemp("cert")
    generate(str(d / "c.crt"), str(d / "c.key"), ["localhost", "127.0.0.1"])
    return ServerCert(str(d / "c.crt"), str(d / "c.key"), "").ssl_context()


class Served:
    """One accepted connection handed to start_tls_server, with stream objects."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()
        self.protocol = asyncio.StreamReaderProtocol(self.reader)
        self.writer: asyncio.StreamWriter | None = None
        self.lost: list[BaseException | None] = []


async def serve_one(
    ctx: ssl.SSLContext,
    client: Callable[[int], Awaitable[Any]],
    server: Callable[[Served], Awaitable[None]],
) -> Any:
    """Accept one connection on a fresh port, run ``server`` on it and ``client``
    against it concurrently; return the client's result."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.setblocking(False)
    served = Served()
    original_lost = served.protocol.connection_lost

    def lost(exc: BaseException | None) -> None:
        served.lost.append(exc)
        original_lost(exc)  # type: ignore[arg-type]

    served.protocol.connection_lost = lost  # type: ignore[method-assign]

    async def run_server() -> None:
        conn, _ = await loop.sock_accept(lsock)
        transport, _ = await start_tls_server(loop, conn, lambda: served.protocol, ctx)
        served.writer = asyncio.StreamWriter(transport, served.protocol, served.reader, loop)
        await server(served)

    try:
        # The first failure of either side ends the test (asyncio.run cancels the other).
        result, _ = await asyncio.wait_for(
            asyncio.gather(client(lsock.getsockname()[1]), run_server()), 30
        )
        return result
    finally:
        lsock.close()


async def tls_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
    )


@pytest.mark.parametrize("run", RUNNERS)
def test_handshake_echo_and_extra_info(run: Runner, server_ctx: ssl.SSLContext) -> None:
    async def client(port: int) -> bytes:
        r, w = await tls_client(port)
        w.write(b"ping\n")
        line = await r.readline()
        w.close()
        await w.wait_closed()
        return line

    async def server(s: Served) -> None:
        assert s.writer is not None
        line = await s.reader.readline()
        t = s.writer.transport
        assert t.get_extra_info("peername")[0] == "127.0.0.1"
        assert t.get_extra_info("sockname")[0] == "127.0.0.1"
        assert t.get_extra_info("sslcontext") is server_ctx
        tls = t.get_extra_info("ssl_object")
        assert tls.version() in ("TLSv1.3", "TLSv1.2") and tls.cipher() is not None
        assert t.get_extra_info("socket") is tls
        assert t.get_extra_info("nothing", 7) == 7
        s.writer.write(b"pong:" + line)
        await s.writer.drain()
        assert await s.reader.read() == b""  # the client's close_notify
        await s.writer.wait_closed()
        assert s.lost == [None]

    assert run(serve_one(server_ctx, client, server)) == b"pong:ping\n"


@pytest.mark.parametrize("run", RUNNERS)
def test_large_write_backpressure_then_drain(run: Runner, server_ctx: ssl.SSLContext) -> None:
    size = 64 * 2**20  # more than the kernel's and the client's buffers hold
    payload = bytes(range(256)) * (size // 256)
    gate = asyncio.Event()

    async def client(port: int) -> str:
        r, w = await tls_client(port)
        await gate.wait()  # read nothing until the server saw its buffer fill
        got = await r.readexactly(size)
        w.close()
        return hashlib.sha256(got).hexdigest()

    async def server(s: Served) -> None:
        assert s.writer is not None
        t = s.writer.transport
        t.write(payload)
        assert t.get_write_buffer_size() > HIGH_WATER  # the socket took only part
        drain = asyncio.ensure_future(s.writer.drain())
        await asyncio.sleep(0.2)
        assert not drain.done()  # pause_writing: drain waits for the client
        gate.set()
        await asyncio.wait_for(drain, 20)
        assert t.get_write_buffer_size() <= t.get_write_buffer_limits()[0]

    digest = run(serve_one(server_ctx, client, server))
    assert digest == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("run", RUNNERS)
def test_many_small_writes_keep_order(run: Runner, server_ctx: ssl.SSLContext) -> None:
    frames = [struct.pack("!I", i) * 300 for i in range(2000)]

    async def client(port: int) -> bytes:
        r, w = await tls_client(port)
        data = await r.readexactly(sum(map(len, frames)))
        w.close()
        return data

    async def server(s: Served) -> None:
        assert s.writer is not None
        for f in frames:
            s.writer.write(f)
        await s.writer.drain()

    assert run(serve_one(server_ctx, client, server)) == b"".join(frames)


@pytest.mark.parametrize("run", RUNNERS)
def test_close_flushes_what_is_buffered(run: Runner, server_ctx: ssl.SSLContext) -> None:
    payload = b"x" * (3 * 2**20)

    async def client(port: int) -> bytes:
        r, w = await tls_client(port)
        await asyncio.sleep(0.1)  # let the server's buffer fill first
        data = await r.read()  # until the server's close_notify
        w.close()
        return data

    async def server(s: Served) -> None:
        assert s.writer is not None
        s.writer.write(payload)
        s.writer.close()  # at once: the buffer still holds most of it
        assert s.writer.transport.is_closing()
        await asyncio.wait_for(s.writer.wait_closed(), 20)
        assert s.lost == [None]

    assert run(serve_one(server_ctx, client, server)) == payload


@pytest.mark.parametrize("run", RUNNERS)
def test_peer_reset_is_connection_lost_with_the_error(
    run: Runner, server_ctx: ssl.SSLContext
) -> None:
    async def client(port: int) -> None:
        r, w = await tls_client(port)
        w.write(b"hello\n")
        await w.drain()
        await asyncio.sleep(0.1)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    async def server(s: Served) -> None:
        assert await s.reader.readline() == b"hello\n"
        with pytest.raises(ConnectionResetError):  # not ssl's "EOF in violation of protocol"
            await s.reader.read()
        await asyncio.sleep(0)
        assert len(s.lost) == 1 and isinstance(s.lost[0], ConnectionResetError)

    run(serve_one(server_ctx, client, server))


async def memory_bio_client(port: int) -> tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO]:
    """A TLS client whose records we hold in hand (to cut one in the middle)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context().wrap_bio(inc, out, server_hostname="localhost")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            await loop.sock_sendall(sock, out.read())
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionError("closed in the handshake") from None
            inc.write(data)
    await loop.sock_sendall(sock, out.read())
    return sock, obj, out


@pytest.mark.parametrize("run", RUNNERS)
def test_eof_inside_a_record_ends_the_stream(run: Runner, server_ctx: ssl.SSLContext) -> None:
    """A FIN in the middle of a record delivers none of it: Python's ``ssl`` treats
    an EOF without close_notify as an end (OP_IGNORE_UNEXPECTED_EOF, as uvloop's TLS
    did), and the length-prefixed frame above sees it cut short."""

    async def client(port: int) -> None:
        loop = asyncio.get_running_loop()
        sock, obj, out = await memory_bio_client(port)
        obj.write(b"whole")
        await loop.sock_sendall(sock, out.read())
        obj.write(b"a" * 1000)
        record = out.read()
        await loop.sock_sendall(sock, record[: len(record) // 2])
        sock.shutdown(socket.SHUT_WR)  # FIN in the middle of the record
        await asyncio.sleep(0.5)
        sock.close()

    async def server(s: Served) -> None:
        with pytest.raises(asyncio.IncompleteReadError) as cut:
            await s.reader.readexactly(1005)
        assert cut.value.partial == b"whole"
        assert s.writer is not None
        await asyncio.wait_for(s.writer.wait_closed(), 5)
        assert s.lost == [None]

    run(serve_one(server_ctx, client, server))


@pytest.mark.parametrize("run", RUNNERS)
def test_pause_and_resume_reading(run: Runner, server_ctx: ssl.SSLContext) -> None:
    async def client(port: int) -> None:
        r, w = await tls_client(port)
        w.write(b"one\n")
        await asyncio.sleep(0.3)
        w.write(b"two\n")
        assert await r.readline() == b"done\n"
        w.close()

    async def server(s: Served) -> None:
        assert s.writer is not None
        assert await s.reader.readline() == b"one\n"
        t = s.writer.transport
        t.pause_reading()
        assert not t.is_reading()
        await asyncio.sleep(0.6)  # "two" arrived meanwhile
        assert s.reader._buffer == b""  # type: ignore[attr-defined]
        t.resume_reading()
        assert t.is_reading()
        assert await asyncio.wait_for(s.reader.readline(), 5) == b"two\n"
        s.writer.write(b"done\n")
        await s.writer.drain()

    run(serve_one(server_ctx, client, server))


@pytest.mark.parametrize("run", RUNNERS)
def test_handshake_failure_and_cancel_close_the_socket(
    run: Runner, server_ctx: ssl.SSLContext
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        lsock.setblocking(False)
        port = lsock.getsockname()[1]

        # Not TLS at all: the handshake fails with an SSLError, the socket is closed.
        peer = socket.create_connection(("127.0.0.1", port))
        peer.sendall(b"GET / HTTP/1.0\r\n\r\n")
        conn, _ = await loop.sock_accept(lsock)
        with pytest.raises(ssl.SSLError):
            await start_tls_server(loop, conn, asyncio.Protocol, server_ctx)
        peer.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # unread bytes: a reset
            while peer.recv(100):  # an alert, then EOF; a timeout fails the test
                pass
        peer.close()

        # Silent peer: the caller's deadline cancels the handshake; the socket goes.
        silent = socket.create_connection(("127.0.0.1", port))
        conn, _ = await loop.sock_accept(lsock)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await start_tls_server(loop, conn, asyncio.Protocol, server_ctx)
        silent.settimeout(5)
        assert silent.recv(100) == b""  # the server closed without a word
        silent.close()
        lsock.close()

    run(main())


@pytest.mark.parametrize("run", RUNNERS)
def test_abort_drops_the_buffer_and_tells_the_protocol(
    run: Runner, server_ctx: ssl.SSLContext
) -> None:
    async def client(port: int) -> bytes:
        r, w = await tls_client(port)
        try:
            return await r.read()
        except (ConnectionError, ssl.SSLError):
            return b"reset"
        finally:
            w.transport.abort()

    async def server(s: Served) -> None:
        assert s.writer is not None
        t = s.writer.transport
        t.write(b"y" * 2**22)
        t.abort()
        assert t.is_closing() and t.get_write_buffer_size() == 0
        t.write(b"ignored")
        await asyncio.sleep(0.05)
        assert s.lost == [None]

    got = run(serve_one(server_ctx, client, server))
    assert got == b"reset" or len(got) < 2**22
