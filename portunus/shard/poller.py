"""An edge-triggered epoll set for the sockets of spliced TCP relays.

uvloop's ``add_reader``/``remove_reader`` create and destroy a libuv poll handle
each time an fd's interest goes from none to some (four syscalls to create,
three to destroy, plus the Python objects), and a forwarded connection flips its
interest six times in its life: connect, two pump starts, two EOFs, backpressure.
On the short-connection benchmark that was a third of the shard's CPU.

Here each socket is registered once, ``EPOLLIN | EPOLLOUT | EPOLLRDHUP |
EPOLLET``, and never re-armed; closing the socket removes it from the set.  The
set itself is one fd watched by the event loop, so readiness still arrives
through the loop.  Edge-triggered means an event is reported once per change:
a handler must read until EAGAIN (or remember that it did not) — see
``SplicePump``.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

from portunus.logs import log_event

EPOLLET = select.EPOLLET
MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | EPOLLET
# Bits that mean "try reading" / "try writing": errors and hang-ups wake both sides
# so the next syscall reports them.
IN_BITS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
OUT_BITS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
HUP_BITS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR  # no more data will come
MAX_EVENTS = 256


class Poller:
    """fd -> handler(events) for sockets that live in one shard's epoll set."""

    __slots__ = ("ep", "handlers", "stale", "loop")

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        # fds forgotten while a batch is being dispatched: an event for them later in
        # the same batch belongs to the closed socket, even if the number was reused.
        self.stale: set[int] = set()
        loop.add_reader(self.ep.fileno(), self.dispatch)

    def register(self, fd: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        try:
            self.ep.register(fd, MASK)
        except FileExistsError:
            self.ep.modify(fd, MASK)

    def retarget(self, fd: int, handler: Callable[[int], None]) -> None:
        """Send a registered fd's events elsewhere (no syscall)."""
        self.handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """Drop ``fd`` without a syscall; the caller closes it, which leaves the set."""
        if self.handlers.pop(fd, None) is not None:
            self.stale.add(fd)

    def unregister(self, fd: int) -> None:
        """Remove ``fd`` from the set while it stays open (handed to another path)."""
        if self.handlers.pop(fd, None) is not None:
            self.stale.add(fd)
            try:
                self.ep.unregister(fd)
            except OSError:
                pass

    def dispatch(self) -> None:
        try:
            events = self.ep.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        handlers = self.handlers
        stale = self.stale
        stale.clear()
        for fd, ev in events:
            if stale and fd in stale:
                continue
            handler = handlers.get(fd)
            if handler is None:
                continue
            try:
                handler(ev)
            except Exception as exc:  # noqa: BLE001 - one broken relay must not lose the batch
                log_event("tcp.handler_error", level="error", fd=fd, error=repr(exc))
        stale.clear()

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.ep.fileno())
        except (ValueError, OSError):
            pass
        self.ep.close()
        self.handlers.clear()
