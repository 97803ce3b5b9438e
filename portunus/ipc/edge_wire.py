"""Frames on the edge link: 4-byte big-endian length + JSON object, over asyncio streams.

``read_frame``/``encode_frame`` move the JSON objects themselves (a test or a bench
that plays a peer speaks them raw); the processes read ``read_message``, which
hands back the frame's class (edge_messages.py), and write those classes.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from portunus import safejson
from portunus.ipc import edge_messages
from portunus.ipc.edge_messages import Frame

# Every feature a node of this build can run, as advertised in the link's hello
# (docs/edge.md); the server gates rules on them.  ``local`` advertises the same.
CAPABILITIES = (
    "tcp",
    "udp",
    "range",
    "sni",
    "proxy_protocol",
    "dns",
    "failover",
    "rate_limit",
    "idle_timeout",
)

# The limit of every frame after the link authenticated (before: see
# control.fleet.preauth.PREAUTH_MAX_FRAME).  The largest legitimate frame is a full
# ``sync``; measured for this build (tests/unit/edge/test_frame_limits.py): a typical
# one-port rule is 302 bytes on the wire, so 16 MiB carries ~55,000 of them, while
# a client holding a one-port rule on every TCP and UDP port (131,070 rules) would
# need 39.6 MB.  The limit is thus already below the largest legitimate frame and
# is not raised: it bounds what one authenticated peer can make either side buffer.
# A sync over it is not sent; the server cuts the link and logs why.
MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")
HEADER = _HEADER  # the length prefix, for a reader that cuts frames itself


class WireError(Exception):
    """The peer sent something that is not a frame; close the link."""


class FrameTooLarge(WireError):
    """The length prefix announces more than the reader accepts; the body was not read."""


async def read_frame(reader: asyncio.StreamReader, max_len: int = MAX_FRAME) -> dict[str, Any]:
    """Read one frame of at most ``max_len`` bytes; raises asyncio.IncompleteReadError
    on EOF, ``FrameTooLarge`` on a longer length prefix (before reading any of the
    body, so an announced size costs no memory), WireError on garbage."""
    header = await reader.readexactly(_HEADER.size)
    (length,) = _HEADER.unpack(header)
    if length > max_len:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {max_len}")
    return decode_body(await reader.readexactly(length))


def decode_body(body: bytes) -> dict[str, Any]:
    """A frame's body (after its length prefix) as the JSON object; WireError on garbage."""
    try:
        msg = safejson.loads(body)
    except safejson.JsonRejected as exc:
        raise WireError(f"frame is not JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise WireError("frame is not a JSON object with a type")
    return msg


def to_message(raw: dict[str, Any]) -> Frame:
    """A decoded frame as its class; WireError when its fields do not fit its kind."""
    try:
        return edge_messages.parse(raw)
    except edge_messages.FrameInvalid as exc:
        raise WireError(str(exc)) from None


async def read_message(reader: asyncio.StreamReader, max_len: int = MAX_FRAME) -> Frame:
    """``read_frame``, as its class; WireError when its fields do not fit its kind."""
    return to_message(await read_frame(reader, max_len))


def encode_frame(msg: Frame | dict[str, Any]) -> bytes:
    if isinstance(msg, Frame):
        body = edge_messages.encode(msg)
    else:
        body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise WireError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


async def write_frame(writer: asyncio.StreamWriter, msg: Frame | dict[str, Any]) -> None:
    writer.write(encode_frame(msg))
    await writer.drain()
