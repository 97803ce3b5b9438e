"""Control socket framing: one JSON object per line, each way (docs/rpc.md).

Request ``{"id", "token", "method", "params"}`` → ``{"id", "result"}`` or
``{"id", "error": PortunusError.to_dict()}``.  A line that is not a JSON object
is garbage from something that does not speak the protocol: it gets one error
reply and the connection is closed (``RequestError.fatal``).  A well-formed
object with a bad field only gets an error reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from portunus import safejson
from portunus.errors import PortunusError

MAX_REQUEST_BYTES = 1024 * 1024
IDLE_TIMEOUT_SECS = 60.0


@dataclass(slots=True)
class Request:
    id: Any
    method: str
    token: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # A Web UI session token (the web process forwards the cookie) and the web
    # process's CSRF verdict for it; bearer callers send neither.
    session: str | None = None
    csrf: bool = False


class RequestError(PortunusError):
    """A request that cannot be dispatched; ``fatal`` closes the connection."""

    def __init__(self, message: str, request_id: Any = None, fatal: bool = False) -> None:
        super().__init__("bad_request", message)
        self.request_id = request_id
        self.fatal = fatal


def parse_request(line: bytes) -> Request:
    try:
        msg = safejson.loads(line)
    except safejson.JsonRejected as exc:
        raise RequestError(f"the request is not valid JSON: {exc}", fatal=True) from None
    if not isinstance(msg, dict):
        raise RequestError("the request must be a JSON object", fatal=True)
    rid = msg.get("id")
    if isinstance(rid, (dict, list)):
        raise RequestError("id must be a number or a string", fatal=False)
    method = msg.get("method")
    if not isinstance(method, str) or not method:
        raise RequestError("method must be a non-empty string", rid)
    params = msg.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError("params must be a JSON object", rid)
    token = msg.get("token")
    session = msg.get("session")
    return Request(
        id=rid,
        method=method,
        token=token if isinstance(token, str) else None,
        params=params,
        session=session if isinstance(session, str) else None,
        csrf=msg.get("csrf") is True,
    )


def encode_result(request_id: Any, result: Any) -> bytes:
    return json.dumps({"id": request_id, "result": result}, separators=(",", ":")).encode() + b"\n"


def encode_error(request_id: Any, exc: PortunusError) -> bytes:
    body = {"id": request_id, "error": exc.to_dict()}
    return json.dumps(body, separators=(",", ":"), default=str).encode() + b"\n"
