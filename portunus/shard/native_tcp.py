"""A plain TCP port served entirely by the native relay (accept, connect, relay).

For a rule with no SNI, no PROXY header, no rate limit and only IP-address
targets, nothing per connection needs the interpreter: the native relay
accepts (``accept4``, non-blocking), connects through the candidate list this
handler gives it (health order, fall-through on failure, the rule's connect
timeout), relays, and sums what happened (a busy port's routine counts for up
to ``native.REPORT_MS``, failures and a port going idle or busy at once).  ``report`` turns
one batch into the same Prometheus updates the Python path makes per connection
(connections, active, bytes every 64 KiB and at close, per-target connections
and failures, connect failures) and the same health bookkeeping.

The rule's open native connections appear in ``rt.conns`` as one
``NativeConns`` entry while there are any, so draining, the drain timeout and a
rule update (``Shard.upsert`` moves ``rt.conns``) treat them like Python ones.
Stopping the handler (rule updated or removed) only stops accepting: open
connections carry on and keep reporting here.  Once the last one closed the relay
forgets the listener, and the handler and a removed rule's runtime are freed by
reference counting alone (``NativeConns`` points back at its handler weakly).
"""

from __future__ import annotations

import errno
import os
import socket
import weakref
from typing import TYPE_CHECKING

from portunus.logs import log_throttled

if TYPE_CHECKING:
    from portunus.shard.runtime import RuleRuntime, ShardContext


def eligible(ctx: ShardContext, rt: RuleRuntime) -> bool:
    """Can this rule's plain TCP ports run natively?  Anything else keeps the Python path."""
    rule = rt.rule
    return (
        ctx.native_type is not None
        and ctx.use_splice
        and rt.limits is None
        # An owned rule stays in Python: its owner's caps (docs/owner-caps.md) may be
        # set at any time and must gate every connection, open or new, which the
        # native relay does not do yet.
        and rt.owner_limits is None
        # The idle timeout is swept in Python (TcpConnection.idle_check reads the
        # pumps' counters); the native relay has no idle clock, so such a rule
        # would silently never time out there.
        and rule.idle_timeout_secs is None
        and rt.limiter_in is None
        and rt.limiter_out is None
        and rt.all_literal
        and not rule.proxy_protocol
        and not any(t.proxy_protocol for t in rule.targets)
    )


class NativeConns:
    """Stands for a handler's open native connections in ``rt.conns``.

    It refers to its handler weakly: the handler owns it (``handler.conns``), and a
    strong reference back would make the pair a cycle that keeps the handler and
    its rule runtime alive, after the rule was removed and its last connection
    closed, until a full GC pass.  While connections are open the native relay
    holds the handler (until ``forget_listener``), so the weak reference is alive
    whenever ``rt.conns`` lists this object."""

    __slots__ = ("_handler", "rt")

    def __init__(self, handler: NativeTcpHandler, rt: RuleRuntime) -> None:
        self._handler = weakref.ref(handler)
        self.rt = rt  # Shard.upsert re-points this when the rule is updated

    @property
    def handler(self) -> NativeTcpHandler | None:
        return self._handler()

    def close(self) -> None:
        handler = self._handler()
        if handler is not None:
            handler.close_connections()


class NativeTcpHandler:
    """Serves one TCP port of one rule in the native relay."""

    __slots__ = (
        "ctx",
        "rt",
        "port_index",
        "lsock",
        "handle",
        "account",
        "targets",
        "conns",
        "live",
        "listening",
        "__weakref__",  # NativeConns refers back weakly
    )

    def __init__(
        self, ctx: ShardContext, rt: RuleRuntime, port_index: int, lsock: socket.socket
    ) -> None:
        self.ctx = ctx
        self.rt = rt
        self.port_index = port_index
        self.lsock = lsock
        self.handle: int | None = None
        self.account = rt.accounts[port_index] if rt.accounts else rt.whole
        self.targets = list(rt.rule.targets)
        self.conns = NativeConns(self, rt)
        self.live = 0
        self.listening = False

    def candidates(self) -> list[tuple[str, int, int]]:
        index = {t: i for i, t in enumerate(self.targets)}
        return [(ip, t.port + self.port_index, index[t]) for t, ip in self.rt.candidates()]

    def start(self) -> None:
        native = self.ctx.native
        self.handle = native.listen(
            self,
            self.lsock.fileno(),
            len(self.targets),
            self.candidates(),
            self.ctx.connect_timeout,
        )
        self.listening = True
        self.rt.on_targets.append(self.refresh)

    def refresh(self) -> None:
        if self.listening and self.handle is not None:
            self.ctx.native.relay.set_candidates(self.handle, self.candidates())

    def close(self) -> None:
        """Stop accepting (rule updated or removed); open connections carry on."""
        if not self.listening:
            return
        self.listening = False
        if self.refresh in self.rt.on_targets:
            self.rt.on_targets.remove(self.refresh)
        relay = self.ctx.native.relay
        relay.unlisten(self.handle)
        self._maybe_forget()

    def close_connections(self) -> None:
        """Drain timeout or shard stop: close every open connection now."""
        if self.handle is not None:
            self.report(*self.ctx.native.relay.close_listener(self.handle)[1:])

    def _maybe_forget(self) -> None:
        if not self.listening and self.live == 0 and self.handle is not None:
            counts = self.ctx.native.relay.forget_listener(self.handle)
            if counts is None:
                # The relay's thread accepted after the last report Python read (our
                # ``live`` is stale); that report is on its way, and the one for the
                # last close calls this again.
                return
            self.handle = None
            self.report(*counts[1:])

    def report(
        self,
        opened: int,
        closed: int,
        bytes_in: int,
        bytes_out: int,
        connect_failures: int,
        ok: tuple[int, ...],
        failed: tuple[int, ...],
        errs: tuple[int, ...],
        live: int,
        accept_errno: int,
    ) -> None:
        """One batch of what the native relay did for this port (native.py dispatch)."""
        acc = self.account
        rule_m, port_m = acc.rule, acc.port
        if opened:
            rule_m.connections.inc(opened)
            rule_m.active.inc(opened)
            if port_m is not None:
                port_m.connections.inc(opened)
                port_m.active.inc(opened)
        if bytes_in:
            acc.add_in(bytes_in)
        if bytes_out:
            acc.add_out(bytes_out)
        if closed:
            rule_m.active.dec(closed)
            if port_m is not None:
                port_m.active.dec(closed)
        rt = self.conns.rt
        for i, n in enumerate(failed):
            if not n:
                continue
            target = self.targets[i]
            err = (
                "timeout"
                if errs[i] == errno.ETIMEDOUT
                else errno.errorcode.get(errs[i], str(errs[i]))
            )
            for _ in range(n):  # health counts consecutive refusals one by one
                log_throttled(
                    "tcp.connect_failed",
                    level="warning",
                    rule=rt.rule.id,
                    target=target.label,
                    error=err,
                )
                rt.target_failed(target)
        for i, n in enumerate(ok):
            if n:
                target = self.targets[i]
                rt.target_connected(target)
                if n > 1:
                    rt.target_meters[target].inc(n - 1)
        if connect_failures:
            rt.meters.connect_failures.inc(connect_failures)
        if accept_errno:  # out of fds: the relay left the queue alone for 100 ms
            log_throttled("tcp.accept_error", level="error", error=os.strerror(accept_errno))
        self.live = live
        if live and self.conns not in rt.conns:
            rt.conns.add(self.conns)
        elif not live and self.conns in rt.conns:
            rt.conns.discard(self.conns)
            if rt.draining and not rt.conns:
                self.ctx.rule_drained(rt)
        if not live:
            self._maybe_forget()
