"""Moving bytes one way between two non-blocking sockets.

``SplicePump`` is the zero-copy path: ``splice(2)`` from the source socket into a
pipe and from the pipe into the destination, so payload never enters userspace.
``CopyPump`` is the fallback (``recv_into`` a preallocated buffer + ``send``),
used where splice is unavailable or when a rule caps bandwidth.  ``CopyPump`` is
driven by the event loop's level-triggered readiness callbacks, ``SplicePump`` by
the shard's edge-triggered ``Poller`` (poller.py).  Both apply backpressure
symmetrically: while the destination is full the source is not read, so a slow
reader never makes a shard's memory grow.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import termios
from collections.abc import Callable
from typing import Any

from portunus.logs import log_throttled
from portunus.shard.poller import HUP_BITS, IN_BITS, OUT_BITS

SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1024 * 1024
CHUNK = PIPE_SIZE
PAGE = mmap.PAGESIZE  # a pipe holds size // PAGE buffers (slots)
_INQ = bytearray(4)  # FIONREAD result (a shard is single-threaded)
TO_LOOP_AFTER = 16  # reads that make a relay long-lived (SplicePump)
BURST = 8  # chunks one readiness event may move before yielding to other connections
FLUSH_EVERY = 64 * 1024
COPY_BUF = 256 * 1024
HAVE_SPLICE = hasattr(os, "splice")
# A spliced relay copies its first bytes through one shard-wide buffer and switches
# to splice(2) only once it has moved this many bytes one way and a read was
# bulk-sized (BULK_READ): for a short connection or small messages two splices per
# chunk (and the pipe) cost more than two copies (bench/ANALYSIS.md, "Copy first,
# then splice").  0 splices from the first byte.
DEFAULT_SPLICE_AFTER = 16 * 1024


def splice_after_from_env(value: str | None) -> int:
    """$PORTUNUS_SPLICE_AFTER as bytes; unset or not a non-negative integer: the default."""
    try:
        n = int(value) if value is not None else DEFAULT_SPLICE_AFTER
    except ValueError:
        return DEFAULT_SPLICE_AFTER
    return n if n >= 0 else DEFAULT_SPLICE_AFTER


SPLICE_AFTER = splice_after_from_env(os.environ.get("PORTUNUS_SPLICE_AFTER"))
FIRST_BUF = 64 * 1024  # the shared copy-first buffer
BULK_READ = 16 * 1024  # a read this large (after SPLICE_AFTER bytes) switches a relay to splice


class PipePool:
    """Reuse drained pipes: a pipe() + F_SETPIPE_SZ per connection is measurable
    on the short-connection path, and an empty pipe costs no buffer pages."""

    def __init__(self, limit: int = 256) -> None:
        self.free: list[tuple[int, int]] = []
        self.limit = limit
        self.size = PIPE_SIZE
        self.failures = 0  # pipe() refused (EMFILE/ENFILE): connections failed for it
        # The copy-first buffer, shared by every relay of the shard (single-threaded):
        # a relay never leaves bytes in it between callbacks (see SplicePump.held).
        self.buf = memoryview(bytearray(FIRST_BUF))

    def get(self) -> tuple[int, int]:
        """A drained pipe; OSError (counted) when the process is out of fds."""
        if self.free:
            return self.free.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.failures += 1
            raise
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:
            # Over the per-user pipe budget (fs.pipe-user-pages-soft): keep the default.
            self.size = 64 * 1024
        return r, w

    def put(self, pipe: tuple[int, int], clean: bool) -> None:
        if clean and len(self.free) < self.limit:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


class Pump:
    """One direction of a relay; subclasses move the bytes."""

    __slots__ = (
        "loop",
        "src",
        "dst",
        "sfd",
        "dfd",
        "owner",
        "account",
        "unflushed",
        "reading",
        "writing",
        "eof",
        "done",
        "paused",
        "flushes",
    )

    def __init__(
        self,
        loop: Any,
        src: socket.socket,
        dst: socket.socket,
        owner: Any,
        account: Callable[[int], None],
    ) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self.sfd = src.fileno()
        self.dfd = dst.fileno()
        self.owner = owner  # the relay: told when this direction finishes or fails
        self.account = account  # called with byte counts, at most every FLUSH_EVERY
        self.unflushed = 0
        self.flushes = 0  # with unflushed: changes whenever a byte moved (idle timeouts)
        self.reading = False
        self.writing = False
        self.eof = False
        self.done = False
        self.paused = False  # paused by a rate limiter

    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.sfd, self.on_readable)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sfd)

    def stop_writing(self) -> None:
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dfd)

    def wait_writable(self) -> None:
        self.stop_reading()
        if not self.writing:
            self.writing = True
            self.loop.add_writer(self.dfd, self.on_writable)

    def flush_counter(self) -> None:
        if self.unflushed:
            n, self.unflushed = self.unflushed, 0
            self.flushes += 1
            self.account(n)

    def finish(self) -> None:
        """Source hit EOF and everything was delivered: pass the half-close on."""
        self.stop_reading()
        self.stop_writing()
        self.flush_counter()
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.owner.pump_done(self)

    def fail(self, exc: BaseException | None) -> None:
        self.stop_reading()
        self.stop_writing()
        self.flush_counter()
        self.done = True
        self.owner.pump_failed(self, exc)

    def close(self) -> None:
        self.stop_reading()
        self.stop_writing()
        self.flush_counter()

    def on_readable(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_writable(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class SplicePump(Pump):
    """socket -> pipe -> socket with splice(2).

    A relay starts with both sockets in the shard's edge-triggered ``Poller``:
    registering and pausing cost no uvloop poll handles, which is most of what a
    short connection costs.  Because an edge is reported once, ``ready``
    remembers that the source may still hold bytes (an edge arrived, or a read
    stopped before EAGAIN); ``start`` reads at once then.  After ``TO_LOOP_AFTER``
    reads the relay is long-lived and moves to the loop's level-triggered readers
    (``et`` False), whose per-event dispatch is cheaper than the poller's nested
    one: that is what a chatty or bulk connection costs.

    The first ``splice_after`` bytes, and everything after them until a read is
    bulk-sized (``BULK_READ``), are copied instead (``recv_into`` the pool's
    shared buffer, ``send``): most short connections end before that and never
    take a pipe.  Bytes the destination does not accept at once are kept in
    ``held`` (the shared buffer is free again when the callback returns).
    """

    __slots__ = (
        "pool",
        "pipe",
        "pending",
        "ready",
        "hup",
        "slots",
        "peer",
        "et",
        "reads",
        "copy_left",
        "spliced",
        "held",
    )

    def __init__(
        self,
        loop: Any,
        src: socket.socket,
        dst: socket.socket,
        owner: Any,
        account: Callable[[int], None],
        pool: PipePool,
        ready: bool = False,
        splice_after: int = SPLICE_AFTER,
    ) -> None:
        super().__init__(loop, src, dst, owner, account)
        self.pool = pool
        self.copy_left = splice_after  # bytes still to copy before splicing
        self.spliced = splice_after == 0  # switched to the pipe (see _copy_readable)
        self.held = b""  # copied bytes the destination has not taken yet
        self.pipe: tuple[int, int] | None = None  # allocated on first data: idle conns hold none
        self.pending = 0
        self.ready = ready
        self.hup = False  # the peer's FIN/RST was reported: read on until 0 or an error
        self.slots = 0  # a lower bound on the pipe's buffer count
        self.peer: SplicePump | None = None  # the other direction: it writes to our source
        self.et = True  # driven by the Poller (edge) rather than loop readers (level)
        self.reads = 0

    def start(self) -> None:
        if not self.et:
            super().start()
            return
        self.reading = True
        if self.ready:
            self.on_readable()

    def stop_reading(self) -> None:
        if self.et:
            self.reading = False
        else:
            super().stop_reading()

    def stop_writing(self) -> None:
        if self.et:
            self.writing = False
        else:
            super().stop_writing()

    def wait_writable(self) -> None:
        if self.et:
            self.reading = False
            self.writing = True
        else:
            super().wait_writable()

    def _to_loop(self) -> None:
        """Hand both sockets from the Poller to level-triggered loop callbacks."""
        peer = self.peer
        assert peer is not None
        poller = self.owner.ctx.poller
        for p in (self, peer):
            poller.unregister(p.sfd)
            p.et = False
        for p in (self, peer):
            if p.done:
                continue
            if p.writing:
                self.loop.add_writer(p.dfd, p.on_writable)
            elif p.reading:
                self.loop.add_reader(p.sfd, p.on_readable)

    def on_event(self, ev: int) -> None:
        """Poller handler of our source socket, which is also the peer's destination."""
        if ev & IN_BITS:
            self.ready = True
            if ev & HUP_BITS:
                self.hup = True
            if self.reading:
                self.on_readable()
                self.reads += 1
                if self.reads > TO_LOOP_AFTER and self.et:
                    self._to_loop()
                    return
        peer = self.peer
        if peer is not None and peer.writing and ev & OUT_BITS:
            peer.on_writable()

    def _again(self) -> None:
        if self.et and self.reading and self.ready:
            self.on_readable()

    def on_readable(self) -> None:
        if not self.spliced:
            self._copy_readable()
            return
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = self.pool.get()
            except OSError as exc:
                # Out of fds for a pipe: raising out of this callback would leave
                # the connection open with nobody reading it.  Fail it instead.
                log_throttled("tcp.pipe_failed", level="error", error=str(exc))
                self.fail(exc)
                return
            # The pool's size only ever shrinks, so every pipe it hands out has at least this many.
            self.slots = self.pool.size // PAGE
        r, w = pipe
        splice = os.splice
        sfd, dfd = self.sfd, self.dfd
        burst = BURST
        while burst:
            burst -= 1
            try:
                n = splice(sfd, w, CHUNK, None, None, SPLICE_FLAGS)
            except BlockingIOError:
                self.ready = False  # drained: the next edge says when there is more
                return
            except InterruptedError:
                continue
            except OSError as exc:
                self.fail(exc)
                return
            if n == 0:
                self.eof = True
                self.ready = False
                self.finish()
                return
            self.unflushed += n
            if self.unflushed >= FLUSH_EVERY:
                self.flush_counter()
            # Drain the pipe into the destination.
            pending = n
            while pending:
                try:
                    m = splice(r, dfd, pending, None, None, SPLICE_FLAGS)
                except BlockingIOError:
                    self.pending = pending
                    self.wait_writable()
                    return
                except InterruptedError:
                    continue
                except OSError as exc:
                    self.pending = pending
                    self.fail(exc)
                    return
                pending -= m
            if n < CHUNK and not self.hup and (n < self.slots or self._inq_empty()):
                # A short read into an empty pipe that cannot have run out of slots
                # (each holds at least one byte), or FIONREAD says the socket is empty:
                # saves the EAGAIN splice (and its exception) that would end the edge.
                # A FIN already queued is not missed: its edge carried EPOLLRDHUP
                # (``hup``); one arriving after the edge was taken raises a new edge.
                self.ready = False
                return
        # Still readable after a burst: let the loop's other callbacks run first
        # (level-triggered readiness calls us again by itself).
        if self.et:
            self.loop.call_soon(self._again)

    def _copy_readable(self) -> None:
        """The copy-first phase: recv_into the shared buffer, send it all or hold the rest."""
        buf = self.pool.buf
        size = len(buf)
        recv_into, send = self.src.recv_into, self.dst.send
        burst = BURST
        while burst:
            burst -= 1
            try:
                n = recv_into(buf)
            except BlockingIOError:
                self.ready = False
                return
            except InterruptedError:
                continue
            except OSError as exc:
                self.fail(exc)
                return
            if n == 0:
                self.eof = True
                self.ready = False
                self.finish()
                return
            self.unflushed += n
            if self.unflushed >= FLUSH_EVERY:
                self.flush_counter()
            self.copy_left -= n
            if self.copy_left <= 0 and n >= BULK_READ:
                # Enough has moved and the reads are bulk-sized: splice from here.
                # Small messages (interactive, ping-pong) stay copied for good.
                self.spliced = True
            sent = 0
            while sent < n:
                try:
                    sent += send(buf[sent:n])
                except BlockingIOError:
                    self.held = bytes(buf[sent:n])
                    self.wait_writable()
                    return
                except InterruptedError:
                    continue
                except OSError as exc:
                    self.fail(exc)
                    return
            if n < size and not self.hup:
                # A short read took everything queued (TCP recv drains the receive
                # queue and its backlog); bytes arriving later raise a new edge.
                self.ready = False
                return
            if self.spliced:
                self.on_readable()  # the rest of this edge goes through the pipe
                return
        if self.et:
            self.loop.call_soon(self._again)

    def _inq_empty(self) -> bool:
        try:
            fcntl.ioctl(self.sfd, termios.FIONREAD, _INQ)
        except OSError:
            return False
        return _INQ == b"\0\0\0\0"

    def on_writable(self) -> None:
        while self.held:
            try:
                m = self.dst.send(self.held)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                self.fail(exc)
                return
            self.held = self.held[m:]
        r = self.pipe[0] if self.pipe is not None else -1
        while self.pending:
            try:
                m = os.splice(r, self.dfd, self.pending, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                self.fail(exc)
                return
            self.pending -= m
        self.stop_writing()
        if self.eof:
            self.finish()
        elif not self.paused:
            self.start()

    def close(self) -> None:
        super().close()
        if self.pipe is not None:
            self.pool.put(self.pipe, clean=self.pending == 0)
            self.pipe = None


class CopyPump(Pump):
    """recv_into + send through a preallocated userspace buffer."""

    __slots__ = ("buf", "view", "start_pos", "end_pos", "limiter")

    def __init__(
        self,
        loop: Any,
        src: socket.socket,
        dst: socket.socket,
        owner: Any,
        account: Callable[[int], None],
        limiter: Any = None,
    ) -> None:
        super().__init__(loop, src, dst, owner, account)
        self.buf: bytearray | None = None
        self.view: memoryview | None = None
        self.start_pos = 0
        self.end_pos = 0
        self.limiter = limiter  # optional: .grant(n) -> (allowed, delay)

    def on_readable(self) -> None:
        if self.buf is None:
            self.buf = bytearray(COPY_BUF)
            self.view = memoryview(self.buf)
        assert self.view is not None
        want = COPY_BUF
        if self.limiter is not None:
            want, delay = self.limiter.grant(COPY_BUF)
            if want <= 0:
                self.stop_reading()
                self.paused = True
                self.loop.call_later(delay, self.resume)
                return
        try:
            n = self.src.recv_into(self.view[:want])
        except (BlockingIOError, InterruptedError):
            if self.limiter is not None:
                self.limiter.refund(want)
            return
        except OSError as exc:
            self.fail(exc)
            return
        if self.limiter is not None and n < want:
            self.limiter.refund(want - n)
        if n == 0:
            self.eof = True
            self.finish()
            return
        self.unflushed += n
        if self.unflushed >= FLUSH_EVERY:
            self.flush_counter()
        self.start_pos, self.end_pos = 0, n
        self.on_writable_inner(from_read=True)

    def resume(self) -> None:
        if self.done:
            return
        self.paused = False
        if not self.writing:
            self.start()

    def on_writable_inner(self, from_read: bool) -> None:
        assert self.view is not None
        while self.start_pos < self.end_pos:
            try:
                m = self.dst.send(self.view[self.start_pos : self.end_pos])
            except (BlockingIOError, InterruptedError):
                if from_read:
                    self.wait_writable()
                return
            except OSError as exc:
                self.fail(exc)
                return
            self.start_pos += m
        if not from_read:
            self.stop_writing()
            if not self.paused:
                self.start()

    def on_writable(self) -> None:
        self.on_writable_inner(from_read=False)
