"""Frames on the edge link: 4-byte big-endian length + JSON object, over asyncio streams."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

# Every feature a node of this build can run, as advertised in the link's hello
# (docs/edge.md); the server gates rules on them.  ``local`` advertises the same.
CAPABILITIES = ("tcp", "udp", "range", "sni", "proxy_protocol", "dns", "failover", "rate_limit", "idle_timeout")

MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")


class WireError(Exception):
    """The peer sent something that is not a frame; close the link."""


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Read one frame; raises asyncio.IncompleteReadError on EOF, WireError on garbage."""
    header = await reader.readexactly(_HEADER.size)
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise WireError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    body = await reader.readexactly(length)
    try:
        msg = json.loads(body)
    except ValueError as exc:
        raise WireError(f"frame is not JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise WireError("frame is not a JSON object with a type")
    return msg


def encode_frame(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise WireError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


async def write_frame(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    writer.write(encode_frame(msg))
    await writer.drain()
