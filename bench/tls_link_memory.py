"""RSS per idle server-side TLS link, by how the server terminates TLS.

Issue 16 asks the control process for at most 20 KiB of RSS per idle edge link.
This measures what the TLS layer alone costs per link, in one uvloop process
(``server`` role) holding ``--links`` idle links that a real TLS client in another
process (``client`` role, the edge client's context: no client certificate, the
server's ECDSA P-256 certificate) opened over loopback.  Each link does what an
edge link does before it goes idle: a handshake, one 236-byte frame in (a
``hello``), one 100-byte frame out (a ``welcome``).

Server modes, each with a bare protocol (no streams, no task per link):

- ``uvloop-tls``: ``loop.connect_accepted_socket(ssl=...)`` as the gateway did
  (uvloop's SSLProtocol: a MemoryBIO pair and a 256 KiB read buffer per link);
- ``sslsocket``: a non-blocking ``ssl.SSLSocket`` over the accepted socket
  (OpenSSL's socket BIO), handshake and reads driven by ``add_reader``;
- ``tls-transport``: the gateway's transport over that (``control.fleet.tls_transport``);
- ``tcp``: no TLS, ``connect_accepted_socket`` (a uvloop TCP transport);
- ``tcp-raw``: no TLS, no transport: the socket and an ``add_reader`` callback.

The mmap threshold is pinned and the heap trimmed (``control.fleet.heap``) in
every mode alike.  Per link = (RSS with N links - RSS after a warm-up of the same
kind of links was opened and closed) / N, with and without a trim.

    python -m bench.tls_link_memory --links 2000 [--modes uvloop-tls,sslsocket,tcp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import uvloop

from portunus.control.fleet.cert import ServerCert, generate
from portunus.control.fleet.heap import pin_mmap_threshold, release_free_heap
from portunus.control.fleet.tls_transport import fd_ready
from portunus.edge.pinning import client_context

MODES = ("uvloop-tls", "sslsocket", "tls-transport", "tcp", "tcp-raw")
HELLO = b"h" * 236
WELCOME = b"w" * 100
CONCURRENCY = 64
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_kib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1024


# ---------------------------------------------------------------- server role


class Server:
    def __init__(self, mode: str, ctx: ssl.SSLContext) -> None:
        self.mode = mode
        self.ctx = ctx
        self.links: dict[int, Any] = {}  # id -> what keeps the link alive
        self.ready = 0  # links that got their frame and answered

    def done(self, key: int) -> None:
        self.links.pop(key, None)

    async def serve(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(lsock)
            conn.setblocking(False)
            if self.mode in ("uvloop-tls", "tcp", "tls-transport"):
                loop.create_task(self._transport(conn))
            elif self.mode == "sslsocket":
                loop.create_task(self._sslsocket(conn))
            else:
                self._raw(conn, conn)

    async def _transport(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        proto = Bare(self)
        if self.mode == "tls-transport":
            from portunus.control.fleet.tls_transport import start_tls_server

            await start_tls_server(loop, conn, lambda: proto, self.ctx)
        else:
            ssl_ctx = self.ctx if self.mode == "uvloop-tls" else None
            await loop.connect_accepted_socket(lambda: proto, conn, ssl=ssl_ctx)

    async def _sslsocket(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        s = self.ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        fd = s.fileno()
        try:
            while True:
                try:
                    s.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await fd_ready(loop, fd, False)
                except ssl.SSLWantWriteError:
                    await fd_ready(loop, fd, True)
        except (OSError, ssl.SSLError):
            s.close()
            return
        self._raw(s, conn)

    def _raw(self, s: socket.socket, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        key = id(s)
        got = [0]
        self.links[key] = s

        def readable() -> None:
            while True:
                try:
                    data = s.recv(16384)
                except (ssl.SSLWantReadError, BlockingIOError):
                    return
                except (OSError, ssl.SSLError):
                    data = b""
                if not data:
                    loop.remove_reader(s.fileno())
                    s.close()
                    self.done(key)
                    return
                before, got[0] = got[0], got[0] + len(data)
                if before < len(HELLO) <= got[0]:
                    s.send(WELCOME)
                    self.ready += 1

        loop.add_reader(s.fileno(), readable)
        readable()  # the hello may already sit in OpenSSL's buffer


class Bare(asyncio.Protocol):
    """Counts the hello, answers a welcome once; nothing else per link."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.got = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.links[id(self)] = self

    def data_received(self, data: bytes) -> None:
        before, self.got = self.got, self.got + len(data)
        if before < len(HELLO) <= self.got and self.transport is not None:
            self.transport.write(WELCOME)
            self.server.ready += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.done(id(self))


def server_main(mode: str, cert: str, key: str) -> None:
    pin_mmap_threshold()
    ctx = ServerCert(cert, key, "").ssl_context()
    server = Server(mode, ctx)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4096)
    lsock.setblocking(False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.create_task(server.serve(lsock))
        done = loop.create_future()

        def command(line: str) -> None:
            if not line or line.strip() == "quit":
                if not done.done():
                    done.set_result(None)
                return
            trimmed = False
            if line.strip() == "trim":
                trimmed = release_free_heap()
            out = {"links": len(server.links), "ready": server.ready, "rss_kib": rss_kib()}
            out["trimmed"] = trimmed
            print(json.dumps(out), flush=True)

        def stdin_reader() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(command, line)
            loop.call_soon_threadsafe(command, "")

        threading.Thread(target=stdin_reader, daemon=True).start()
        print(json.dumps({"port": lsock.getsockname()[1]}), flush=True)
        await done

    uvloop.run(main())


# ---------------------------------------------------------------- client role


def client_main(port: int, tls: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ctx = client_context() if tls else None
        sem = asyncio.Semaphore(CONCURRENCY)
        open_links: list[asyncio.StreamWriter] = []

        async def one() -> None:
            async with sem:
                for attempt in range(5):
                    try:
                        r, w = await asyncio.open_connection(
                            "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if tls else None
                        )
                        break
                    except OSError:
                        if attempt == 4:
                            raise
                        await asyncio.sleep(0.2)
                w.write(HELLO)
                await r.readexactly(len(WELCOME))
                open_links.append(w)

        queue: asyncio.Queue[str] = asyncio.Queue()
        threading.Thread(
            target=lambda: (
                [loop.call_soon_threadsafe(queue.put_nowait, x) for x in sys.stdin]
                + [loop.call_soon_threadsafe(queue.put_nowait, "")]
            ),
            daemon=True,
        ).start()
        while True:
            cmd = (await queue.get()).split()
            if not cmd or cmd[0] == "quit":
                return
            if cmd[0] == "open":
                await asyncio.gather(*(one() for _ in range(int(cmd[1]))))
            elif cmd[0] == "close":
                for w in open_links:
                    w.transport.abort()
                open_links.clear()
            print(json.dumps({"open": len(open_links)}), flush=True)

    uvloop.run(main())


# ---------------------------------------------------------------- driver


class Proc:
    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "bench.tls_link_memory", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, line: str) -> dict[str, Any]:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return dict(json.loads(self.p.stdout.readline()))

    def first(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        return dict(json.loads(self.p.stdout.readline()))

    def stop(self) -> None:
        assert self.p.stdin is not None
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def settle(server: Proc, links: int, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until the server holds ``links`` links that all answered (or none)."""
    deadline = time.monotonic() + timeout
    while True:
        st = server.ask("stat")
        if st["links"] == links and (links == 0 or st["ready"] >= links):
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"server holds {st}, expected {links} links")
        time.sleep(0.2)


def measure(mode: str, links: int, warm: int, cert: str, key: str) -> dict[str, Any]:
    server = Proc(["--role", "server", "--mode", mode, "--cert", cert, "--key", key])
    try:
        port = server.first()["port"]
        client = Proc(
            ["--role", "client", "--port", str(port)]
            + (["--plain"] if mode.startswith("tcp") else [])
        )
        try:
            client.ask(f"open {warm}")
            settle(server, warm)
            client.ask("close")
            settle(server, 0)
            time.sleep(1.0)
            base = server.ask("trim")["rss_kib"]
            t0 = time.monotonic()
            client.ask(f"open {links}")
            settle(server, links)
            opened = time.monotonic() - t0
            time.sleep(3.0)  # idle: nothing moves
            untrimmed = server.ask("stat")["rss_kib"]
            trimmed = server.ask("trim")["rss_kib"]
            client.ask("close")
            settle(server, 0)
        finally:
            client.stop()
    finally:
        server.stop()
    return {
        "mode": mode,
        "links": links,
        "open_secs": round(opened, 1),
        "base_kib": round(base),
        "per_link_kib": round((untrimmed - base) / links, 2),
        "per_link_kib_trimmed": round((trimmed - base) / links, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=("driver", "server", "client"), default="driver")
    ap.add_argument("--mode", choices=MODES)
    ap.add_argument("--modes", default="uvloop-tls,sslsocket,tcp,tcp-raw")
    ap.add_argument("--links", type=int, default=2000)
    ap.add_argument("--warm", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--port", type=int)
    ap.add_argument("--plain", action="store_true")
    args = ap.parse_args()
    if args.role == "server":
        server_main(args.mode, args.cert, args.key)
        return
    if args.role == "client":
        client_main(args.port, not args.plain)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = os.path.join(tmp, "server.crt"), os.path.join(tmp, "server.key")
        generate(cert, key, ["localhost", "127.0.0.1"])
        print(f"# load average {os.getloadavg()}", flush=True)
        for _ in range(args.repeat):
            for mode in args.modes.split(","):
                print(json.dumps(measure(mode, args.links, args.warm, cert, key)), flush=True)
        print(f"# load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
