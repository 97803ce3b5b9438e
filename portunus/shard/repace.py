"""Bring an open spliced relay under a bandwidth cap that appeared after it started.

An uncapped connection relays with ``SplicePump``s and holds no limiter.  When
its owner gets a bandwidth cap (``Shard.owner_caps``), every open connection of
that owner's rules must be paced at once, so each capped direction is switched
to a ``CopyPump`` over the rule's pacer; the other direction keeps splice on the
loop's level-triggered readers (the layout ``TcpConnection.start_pumps`` builds
for a capped rule).  A direction whose pipe still holds bytes for a destination
that cannot take them now is switched once the pipe has drained (checked again
shortly): bytes in a pipe cannot move into a userspace buffer.

Runs only on a cap change; the relay path itself is untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from portunus.shard.pumps import CopyPump, SplicePump

if TYPE_CHECKING:
    from portunus.shard.runtime import RuleRuntime

RETRY_SECS = 0.05
MAX_TRIES = 200  # 10 s of a destination that takes nothing: leave that relay be


def repace_rule(rt: RuleRuntime) -> None:
    """Pace the open spliced connections of ``rt`` by its current limiters."""
    if rt.limiter_in is None and rt.limiter_out is None:
        return
    for conn in list(rt.conns):
        repace(conn, 0)


def repace(conn: Any, tries: int) -> None:
    pumps = getattr(conn, "pumps", None)
    if pumps is None or conn.closed:
        return  # not relaying yet (start_pumps reads the runtime's limiters) or a UDP flow
    limiters = (conn.rt.limiter_in, conn.rt.limiter_out)
    switch = [
        isinstance(p, SplicePump) and not p.done and lim is not None
        for p, lim in zip(pumps, limiters, strict=True)
    ]
    if not any(switch):
        return
    if any(p.pending for p, s in zip(pumps, switch, strict=True) if s):
        if tries < MAX_TRIES:
            conn.ctx.loop.call_later(RETRY_SECS, repace, conn, tries + 1)
        return
    loop = conn.ctx.loop
    poller = conn.ctx.poller
    for p in pumps:
        if isinstance(p, SplicePump) and p.et:
            poller.unregister(p.sfd)  # both leave the poller, as in SplicePump._to_loop
    new: list[Any] = []
    for p, lim, s in zip(pumps, limiters, switch, strict=True):
        if s:
            p.close()  # its pipe is empty: back to the pool
            copy = CopyPump(loop, p.src, p.dst, conn, p.account, lim)
            copy.eof = p.eof
            new.append(copy)
            continue
        if isinstance(p, SplicePump) and p.et:
            p.et = False
            if not p.done:
                if p.writing:
                    loop.add_writer(p.dfd, p.on_writable)
                elif p.reading:
                    loop.add_reader(p.sfd, p.on_readable)
        new.append(p)
    conn.pumps = (new[0], new[1])
    for p, s in zip(new, switch, strict=True):
        if s:
            p.start()
