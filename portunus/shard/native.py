"""The optional native relay (``_relay.c``) as the shard's loop sees it.

Once a plain TCP connection is connected (and any prelude written), its two
sockets can be handed to the native relay instead of two ``SplicePump`` objects:
the relay keeps them in its own edge-triggered epoll set, moves the bytes
(copy first, then splice, same backpressure and half-close as pumps.py) and
reports byte counts (every 64 KiB of a direction and at close) and closes in
batches from ``Relay.poll()``.  The shard stays a uvloop process: the relay's
epoll fd is one reader on the loop, and metrics, control and everything that
is not a plain relay stay in Python.

By default the relay runs its own thread (``Relay(threaded=True)``): it blocks
in ``epoll_wait`` on that set, which then also holds the UDP sockets, and
handles every event without the GIL; the loop's one reader is then an eventfd
the thread writes only when a batch of reports is due (or a UDP flow waits for
``admit_flow``).  That takes uvloop's callback (the GIL, ``Handle._run``) and the
nested epoll set off every event.  ``PORTUNUS_NATIVE_THREAD=0`` drives the relay
from the loop instead (its epoll fd as the reader, UDP sockets as loop readers).

``PORTUNUS_NATIVE=0`` (or the extension missing: no compiler at install time,
or it fails to import) keeps the Python relay; the shard logs one warning line
at start in the latter case.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from portunus.logs import log_event, log_throttled

ENV = "PORTUNUS_NATIVE"
THREAD_ENV = "PORTUNUS_NATIVE_THREAD"

# A busy natively served port hands its counts (connections, active, bytes,
# per-target connects) to Python at most this often instead of on every poll():
# one batch of Prometheus updates per 40 ms rather than per one or two
# connections.  The relay's 50 ms tick delivers a held batch, so /metrics is at
# most ~90 ms behind; failures, fd exhaustion and a port going idle or busy go out at once.
REPORT_MS = 40


def load() -> tuple[Any, str | None]:
    """(the Relay type or None, why not).  ``why`` is None when disabled on purpose."""
    if os.environ.get(ENV, "1").strip() == "0":
        return None, None
    try:
        from portunus.shard._relay import Relay
    except Exception as exc:  # noqa: BLE001 - ImportError, a broken build: fall back
        return None, f"{type(exc).__name__}: {exc}"
    return Relay, None


def announce(shard_index: int, why: str | None) -> None:
    """The one warning line a shard writes when it falls back (shard 0 only)."""
    if why is not None and shard_index == 0:
        log_event(
            "shard.native_unavailable",
            level="warning",
            error=why,
            message=f"native relay not loaded; using the Python relay (set {ENV}=0 to silence)",
        )


class NativeRelay:
    """One shard's native relay: add connected pairs, dispatch its reports."""

    __slots__ = ("loop", "relay", "scheduled")

    def __init__(self, loop: Any, relay_type: Any, splice_after: int) -> None:
        self.loop = loop
        threaded = os.environ.get(THREAD_ENV, "1").strip() != "0"
        self.relay = relay_type(splice_after=splice_after, report_ms=REPORT_MS, threaded=threaded)
        self.scheduled = False
        loop.add_reader(self.relay.fileno(), self.dispatch)

    def add(self, conn: Any, cfd: int, ufd: int) -> int:
        """Hand over both fds (the relay closes them); ``conn`` gets the reports."""
        return self.relay.add(cfd, ufd, conn)

    def close(self, handle: int) -> tuple[int, int]:
        """Close one connection now; the bytes it moved since its last report."""
        return self.relay.close(handle)

    def listen(
        self,
        handler: Any,
        lfd: int,
        ntargets: int,
        candidates: list[tuple[str, int, int]],
        timeout: float,
    ) -> int:
        """Accept on ``lfd`` natively; ``handler.report(...)`` gets the batched counts."""
        return self.relay.listen(lfd, handler, ntargets, candidates, timeout)

    def dispatch(self) -> None:
        self.scheduled = False
        reports, lreports, more = self.relay.poll()
        for rep in lreports:
            try:
                rep[0].report(*rep[1:])
            except Exception as exc:  # noqa: BLE001 - one rule's bookkeeping must not lose the batch
                log_event("tcp.handler_error", level="error", error=repr(exc))
        for conn, din, dout, closed, err in reports:
            acc = conn.account
            if din:
                acc.add_in(din)
            if dout:
                acc.add_out(dout)
            if closed:
                if err in (errno.EMFILE, errno.ENFILE):
                    log_throttled("tcp.pipe_failed", level="error", error=os.strerror(err))
                try:
                    conn.native_closed()
                except Exception as exc:  # noqa: BLE001 - one connection must not lose the batch
                    log_event("tcp.handler_error", level="error", error=repr(exc))
        if more and not self.scheduled:
            # A connection yielded after a burst: finish it after the loop's other work.
            self.scheduled = True
            self.loop.call_soon(self.dispatch)

    @property
    def live(self) -> int:
        return int(self.relay.live)

    def shutdown(self) -> None:
        try:
            self.loop.remove_reader(self.relay.fileno())
        except (ValueError, OSError):
            pass
        self.relay.close_all()
        self.relay.stop()  # joins the relay thread
