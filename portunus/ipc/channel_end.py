"""A child's end of the supervisor channel (docs/rpc.md, "Process boundaries").

``SupervisorEnd`` is the rule source's end, used by the control process
(``portunus.control.local_link``) and by the edge client's link child
(``portunus.edge.link``): the shared non-blocking ``Channel`` driven by
``loop.add_reader``/``add_writer``.  Every message from the supervisor (``hello``,
``applied``, ``retried``, ``removed``, ``settings``) goes to one callback; fds are
never expected and are closed.  When the channel closes the supervisor is gone (or
broke the protocol) and the owner must exit rather than run without a data plane.
``say_up`` is the whole end of a child that only says it started (web, metrics).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from portunus.ipc.framing import Channel, ProtocolError, close_fds, encode
from portunus.ipc.messages import Message, Up


def say_up(channel: socket.socket) -> None:
    """In a child without a rule-source channel end (web, metrics): tell the
    supervisor this child is up, with one ``up`` frame.  A child that dies before
    it said so could not start (supervisor/policy.py)."""
    try:
        channel.sendall(encode(Up()))
    except OSError:
        pass  # the supervisor is gone; PDEATHSIG ends us


class SupervisorEnd:
    """One non-blocking channel end inside an asyncio loop; ``on_close`` fires once."""

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Message], None],
        on_close: Callable[[str], None],
    ) -> None:
        self.channel = Channel(sock)
        self.on_message = on_message
        self.on_close = on_close
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer_on = False
        self._gone = False

    def start(self) -> None:
        """Begin reading (inside the running loop of the link process)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.channel.fileno(), self._on_readable)

    @property
    def closed(self) -> bool:
        return self._gone or self.channel.closed

    def send(self, msg: Message) -> None:
        if self.closed:
            return
        self.channel.send(msg)
        self._after_write()

    def close(self) -> None:
        self._detach()
        self.channel.close()

    def _detach(self) -> None:
        fd = self.channel.sock.fileno()
        if self._loop is not None and fd >= 0:
            self._loop.remove_reader(fd)
            if self._writer_on:
                self._loop.remove_writer(fd)
        self._writer_on = False

    def _after_write(self) -> None:
        if self.channel.closed:
            self._lost("the supervisor channel broke while writing")
            return
        want = self.channel.wants_write
        if want != self._writer_on and self._loop is not None:
            if want:
                self._loop.add_writer(self.channel.fileno(), self._on_writable)
            else:
                self._loop.remove_writer(self.channel.fileno())
            self._writer_on = want

    def _on_writable(self) -> None:
        self.channel.flush()
        self._after_write()

    def _on_readable(self) -> None:
        try:
            frames = self.channel.read()
        except EOFError:
            self._lost("the supervisor closed the channel")
            return
        except ProtocolError as exc:
            self._lost(f"the supervisor sent a bad frame: {exc}")
            return
        for msg, fds in frames:
            close_fds(fds)  # never expected on this channel; do not leak them
            self.on_message(msg)
        if self.channel.closed:
            self._lost("the supervisor closed the channel")

    def _lost(self, why: str) -> None:
        if self._gone:
            return
        self._gone = True
        self.channel.closed = True
        self._detach()
        self.on_close(why)
