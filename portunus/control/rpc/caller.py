"""Client of the control socket: the one way the CLI and the web talk to control."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from typing import Any

from portunus.errors import PortunusError

MAX_LINE = 16 * 1024 * 1024
_ids = itertools.count(1)


def _unavailable(path: str, exc: OSError) -> PortunusError:
    if isinstance(exc, PermissionError):  # the server may well be running: say who may connect
        return PortunusError(
            "unavailable",
            f"this user may not open the control socket {path} (permission denied); it is for "
            "root and the members of its group (portunus when installed from the package)",
            denied=True,
        )
    return PortunusError(
        "unavailable",
        f"cannot reach the control socket {path} ({exc.strerror or exc}); "
        "is `portunus-server serve` running? (--socket / PORTUNUS_SOCKET to point elsewhere)",
    )


def _result(reply: dict[str, Any]) -> Any:
    if "error" in reply and reply["error"] is not None:
        raise PortunusError.from_dict(reply["error"])
    return reply.get("result")


def call_sync(
    socket_path: str,
    token: str | None,
    method: str,
    params: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> Any:
    """One blocking request/reply; for the CLI."""
    req = {"id": next(_ids), "token": token, "method": method, "params": params or {}}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise PortunusError("internal", "reply from control exceeds the size limit")
    except TimeoutError:
        raise PortunusError(
            "unavailable", f"no reply from the control socket within {timeout:g} s"
        ) from None
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
        raise _unavailable(socket_path, exc) from None
    if not buf:
        raise PortunusError(
            "unavailable", "the control process closed the connection without a reply"
        )
    return _result(json.loads(buf))


class ControlCaller:
    """Async client with one connection per call (cheap on a Unix socket, and a
    crashed control process never leaves a half-broken pooled connection)."""

    def __init__(self, socket_path: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.token = token
        self.timeout = timeout

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        token: str | None = None,
        session: str | None = None,
        csrf: bool = False,
    ) -> Any:
        """``session``/``csrf``: a Web UI cookie's session token and the web
        process's verdict on the request's CSRF header and Origin."""
        req: dict[str, Any] = {
            "id": next(_ids),
            "token": token if token is not None else self.token,
            "method": method,
            "params": params or {},
        }
        if session is not None:
            req["session"] = session
            req["csrf"] = csrf
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=MAX_LINE)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            raise _unavailable(self.socket_path, exc) from None
        try:
            writer.write(json.dumps(req).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), self.timeout)
        except TimeoutError:
            raise PortunusError(
                "unavailable", "no reply from the control process in time"
            ) from None
        finally:
            writer.close()
        if not line:
            raise PortunusError(
                "unavailable", "the control process closed the connection without a reply"
            )
        return _result(json.loads(line))
