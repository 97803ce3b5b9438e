"""Framing for every supervisor channel: a header (4-byte big-endian body length,
2-byte fd count) + one JSON message (messages.py), with fds.

Supervisor <-> shard and supervisor <-> service channels are AF_UNIX stream
socketpairs.  A frame may carry file descriptors (listening sockets) as
SCM_RIGHTS; they are attached to the frame's first byte, so the receiver queues
every fd it gets and a frame whose header counts k fds takes the next k from that
queue.  Each body is decoded into its message class here, at the boundary: a
frame that is not a valid message is a ``ProtocolError`` naming what is wrong.
The same ``Channel`` class is used by the synchronous supervisor (driven by a
selector) and by asyncio processes (driven by ``loop.add_reader``/``add_writer``):
it never blocks, it only buffers.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections import deque
from collections.abc import Sequence

import msgspec

from portunus.ipc import messages
from portunus.ipc.messages import Message

MAX_FRAME = 32 * 1024 * 1024
MAX_FDS_PER_FRAME = 250  # the kernel's SCM_MAX_FD is 253
_HEADER = struct.Struct(">IH")  # body length, fds attached
_RECV_CHUNK = 256 * 1024
_RECV_FDS = 256


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame; drop the channel."""


def encode(msg: Message, nfds: int = 0) -> bytes:
    """One whole frame: header and body."""
    body = messages.encode(msg)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body), nfds) + body


def close_fds(fds: Sequence[int]) -> None:
    """Close fds that came with a frame that does not take them."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Channel:
    """A non-blocking framed message channel over an AF_UNIX stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._inbuf = bytearray()
        self._infds: deque[int] = deque()
        # Outgoing chunks: (bytes, fds-to-attach-to-first-byte).
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    # ------------------------------------------------------------ sending

    def send(self, msg: Message, fds: Sequence[int] = ()) -> None:
        """Queue a frame and try to write it now.

        The fds must stay open until ``wants_write`` is False (the supervisor
        keeps its listening sockets open anyway).
        """
        if len(fds) > MAX_FDS_PER_FRAME:
            raise ValueError(f"at most {MAX_FDS_PER_FRAME} fds per frame")
        self._out.append((memoryview(encode(msg, len(fds))), list(fds)))
        self.flush()

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def flush(self) -> bool:
        """Write as much as the socket takes; True when everything is out."""
        while self._out and not self.closed:
            data, fds = self._out[0]
            try:
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    n = self.sock.sendmsg([data], anc)
                else:
                    n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                # The peer is gone; the reader side will see EOF and clean up.
                self.closed = True
                self._out.clear()
                return False
            if n == len(data):
                self._out.popleft()
            else:
                self._out[0] = (data[n:], [])
        return not self._out

    # ----------------------------------------------------------- receiving

    def read(self) -> list[tuple[Message, list[int]]]:
        """Read what is available; return complete frames with their fds.

        Raises EOFError when the peer closed the channel and ProtocolError on
        garbage.
        """
        eof = False
        fd_size = socket.CMSG_SPACE(_RECV_FDS * array.array("i").itemsize)
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(_RECV_CHUNK, fd_size)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                eof = True
                break
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
                    self._infds.extend(fds)
            if not data:
                eof = True
                break
            self._inbuf += data
            if len(data) < _RECV_CHUNK:
                break
        frames = self._parse()
        if eof and not frames:
            self.closed = True
            raise EOFError("channel closed by peer")
        if eof:
            self.closed = True
        return frames

    def _parse(self) -> list[tuple[Message, list[int]]]:
        frames: list[tuple[Message, list[int]]] = []
        buf = self._inbuf
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            length, nfds = _HEADER.unpack_from(buf, pos)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame length {length} exceeds {MAX_FRAME}")
            if len(buf) - pos - _HEADER.size < length:
                break
            start = pos + _HEADER.size
            try:
                msg = messages.decode(bytes(buf[start : start + length]))
            except msgspec.DecodeError as exc:
                raise ProtocolError(f"frame is not a valid message: {exc}") from None
            pos = start + length
            if nfds > len(self._infds):
                raise ProtocolError(f"frame announces {nfds} fds, {len(self._infds)} received")
            fds = [self._infds.popleft() for _ in range(nfds)]
            frames.append((msg, fds))
        if pos:
            del buf[:pos]
        return frames

    def close(self) -> None:
        self.closed = True
        close_fds(self._infds)
        self._infds.clear()
        self.sock.close()
