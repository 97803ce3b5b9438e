"""The control socket server: one task per connection, requests in sequence.

Input never takes the process down: every failure of a request becomes an error
reply (unknown exceptions are logged with their traceback and answered as
``internal``), and garbage, oversize lines or an idle peer get one
``bad_request`` reply before the connection is closed.
"""

from __future__ import annotations

import asyncio
import grp
import os
import stat
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from portunus.control.rpc.protocol import (
    IDLE_TIMEOUT_SECS,
    MAX_REQUEST_BYTES,
    Request,
    RequestError,
    encode_error,
    encode_result,
    parse_request,
)
from portunus.errors import PortunusError
from portunus.logs import log_event

SOCKET_MODE = 0o660
SOCKET_GROUP = "portunus"
Dispatch = Callable[[Request], Awaitable[Any]]


def remove_stale_socket(path: str) -> None:
    """A socket file left by a control process that died; never delete anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PortunusError(
            "internal", f"{path} exists and is not a socket; refusing to replace it"
        )
    os.unlink(path)


def _set_owner_group(path: str) -> None:
    """Give the socket to group portunus so members can use the CLI.  Under the
    packaged unit (User=/Group=portunus) it already is, and chown may be filtered
    (SystemCallFilter=~@privileged answers EPERM): so no call when the group is
    right, and a failure is a warning, never a reason not to serve."""
    try:
        gid = grp.getgrnam(SOCKET_GROUP).gr_gid
    except KeyError:
        return
    try:
        if os.stat(path).st_gid == gid:
            return
        os.chown(path, -1, gid)
    except OSError as exc:
        log_event(
            "control.socket_group",
            level="warning",
            path=path,
            group=SOCKET_GROUP,
            error=exc.strerror or str(exc),
        )


class RpcServer:
    """Serves ``dispatch`` on a Unix socket (control process)."""

    def __init__(
        self,
        path: str,
        dispatch: Dispatch,
        idle_timeout: float = IDLE_TIMEOUT_SECS,
        max_request: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.path = path
        self.dispatch = dispatch
        self.idle_timeout = idle_timeout
        self.max_request = max_request
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        remove_stale_socket(self.path)
        self._server = await asyncio.start_unix_server(
            self._on_connect, path=self.path, limit=self.max_request
        )
        os.chmod(self.path, SOCKET_MODE)
        _set_owner_group(self.path)

    async def close(self) -> None:
        """Stop accepting, drop open connections and remove the socket file."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - a connection must never take the process down
            log_event("control.rpc_crash", level="error", traceback=traceback.format_exc())
        finally:
            self._conns.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            last = False
            try:
                async with asyncio.timeout(
                    self.idle_timeout
                ):  # not wait_for: it can swallow a cancel on 3.11
                    line = await reader.readuntil(b"\n")
            except TimeoutError:
                await self._reply(
                    writer,
                    encode_error(
                        None, RequestError(f"connection idle for {self.idle_timeout:g} s; closing")
                    ),
                )
                return
            except asyncio.LimitOverrunError:
                await self._reply(
                    writer,
                    encode_error(
                        None, RequestError(f"request exceeds {self.max_request} bytes; closing")
                    ),
                )
                return
            except asyncio.IncompleteReadError as exc:
                if not exc.partial.strip():
                    return  # the peer closed between requests
                line, last = exc.partial, True  # a last request without its newline
            if not line.strip():
                continue
            reply, fatal = await self._handle(line)
            await self._reply(writer, reply)
            if fatal or last:
                return

    async def _handle(self, line: bytes) -> tuple[bytes, bool]:
        try:
            req = parse_request(line)
        except RequestError as exc:
            return encode_error(exc.request_id, exc), exc.fatal
        try:
            return encode_result(req.id, await self.dispatch(req)), False
        except PortunusError as exc:
            return encode_error(req.id, exc), False
        except Exception:  # noqa: BLE001 - answered as internal, logged with the traceback
            log_event(
                "control.rpc_error",
                level="error",
                method=req.method,
                traceback=traceback.format_exc(),
            )
            return encode_error(
                req.id, PortunusError("internal", "internal error; see the server log")
            ), False

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
