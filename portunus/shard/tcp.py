"""TCP forwarding inside a shard: accept, connect to a target, relay both ways.

Everything here is callback-driven on the shard's event loop (no task per
connection): a connection is accepted, a non-blocking connect is started to the
best target, a failed connect falls through to the next candidate inside the same
downstream connection, and once connected two pumps copy bytes (splice when the rule
allows, userspace copy otherwise).  A *prelude* (PROXY protocol header, replayed
ClientHello bytes) is written to the target before the pumps start.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING, Any

from portunus.logs import log_throttled
from portunus.shard.poller import IN_BITS, OUT_BITS
from portunus.shard.pumps import HAVE_SPLICE, CopyPump, SplicePump

if TYPE_CHECKING:
    from portunus.rules import Target
    from portunus.shard.runtime import PortAccount, RuleRuntime, ShardContext

ACCEPT_BATCH = 128
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpConnection:
    """One forwarded TCP connection, from accept to close."""

    __slots__ = (
        "ctx",
        "rt",
        "downstream",
        "account",
        "port_index",
        "prelude",
        "upstream",
        "candidates",
        "pos",
        "timer",
        "pumps",
        "closed",
        "target",
        "tried_target",
        "target_failed",
        "slot",
        "up_events",
        "native",
        "idle_sig",
        "idle_since",
    )

    def __init__(
        self,
        ctx: ShardContext,
        rt: RuleRuntime,
        downstream: socket.socket,
        port_index: int,
        prelude: bytes = b"",
    ) -> None:
        self.ctx = ctx
        self.rt = rt
        self.downstream = downstream
        self.port_index = port_index
        self.account: PortAccount = rt.accounts[port_index] if rt.accounts else rt.whole
        self.prelude = prelude
        self.upstream: socket.socket | None = None
        self.candidates: list[tuple[Target, str]] = []
        self.pos = 0
        self.timer: Any = None
        self.pumps: tuple[Any, Any] | None = None
        self.closed = False
        self.target: Target | None = None
        self.tried_target: Target | None = None
        self.target_failed = False
        self.slot, rt.slot = rt.slot, None  # taken by rt.admit() just before (rate limits)
        self.up_events = 0  # upstream readiness seen before the pumps existed
        self.native: int | None = None  # handle in the shard's native relay, when it relays us
        self.idle_sig: tuple[int, int, int, int] | None = None
        self.idle_since = 0.0
        rt.conns.add(self)
        self.account.opened()

    # --------------------------------------------------------------- connect

    def start(self) -> None:
        self.candidates = self.rt.candidates()
        self.try_next()

    async def _resolve_then_connect(self, target: Target) -> None:
        """Replace the unresolved candidate at ``pos`` with its addresses, go on."""
        addrs = await self.rt.resolve(target)
        if self.closed:
            return
        self.candidates[self.pos : self.pos + 1] = [(target, a) for a in addrs]
        self.try_next()

    def try_next(self) -> None:
        while self.pos < len(self.candidates):
            target, ip = self.candidates[self.pos]
            if not ip:
                self.ctx.spawn(self._resolve_then_connect(target))
                return
            self.pos += 1
            if self.tried_target is not target:
                if self.tried_target is not None and self.target_failed:
                    self.rt.target_failed(self.tried_target)
                self.tried_target = target
                self.target_failed = True
            port = target.port + self.port_index
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            try:
                up = socket.socket(
                    family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
            except OSError as exc:
                log_throttled(
                    "tcp.socket_failed", level="error", rule=self.rt.rule.id, error=str(exc)
                )
                break
            self.up_events = 0
            err = up.connect_ex((ip, port))
            if err == 0:
                self.upstream = up
                self.ctx.poller.register(up.fileno(), self.on_up_event)
                self.connected(target)
                return
            if err == errno.EINPROGRESS:
                self.upstream = up
                self.target = target
                # Registered once for connect and relay alike (edge-triggered, poller.py).
                self.ctx.poller.register(up.fileno(), self.on_up_event)
                self.timer = self.ctx.loop.call_later(
                    self.ctx.connect_timeout, self.on_connect_timeout
                )
                return
            up.close()
            log_throttled(
                "tcp.connect_failed",
                level="warning",
                rule=self.rt.rule.id,
                target=f"{ip}:{port}",
                error=errno.errorcode.get(err, str(err)),
            )
        if self.tried_target is not None and self.target_failed:
            self.rt.target_failed(self.tried_target)
            self.tried_target = None
        self.rt.connect_failed()
        self.close()

    def on_up_event(self, ev: int) -> None:
        """Readiness of the upstream socket until the pumps take it over."""
        self.up_events |= ev
        if self.timer is not None and ev & OUT_BITS:
            self.on_connect_ready()

    def on_connect_ready(self) -> None:
        up = self.upstream
        assert up is not None and self.target is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            log_throttled(
                "tcp.connect_failed",
                level="warning",
                rule=self.rt.rule.id,
                target=self.target.label,
                error=errno.errorcode.get(err, str(err)),
            )
            self.ctx.poller.forget(up.fileno())
            up.close()
            self.upstream = None
            self.try_next()
            return
        self.connected(self.target)

    def on_connect_timeout(self) -> None:
        self.timer = None
        up = self.upstream
        if up is None or self.closed:
            return
        self.ctx.poller.forget(up.fileno())
        log_throttled(
            "tcp.connect_failed",
            level="warning",
            rule=self.rt.rule.id,
            target=self.target.label if self.target else "?",
            error="timeout",
        )
        up.close()
        self.upstream = None
        self.try_next()

    # ----------------------------------------------------------------- relay

    def connected(self, target: Target) -> None:
        up = self.upstream
        assert up is not None
        self.target = target
        self.target_failed = False
        self.rt.target_connected(target)
        try:
            up.setsockopt(*_NODELAY)
        except OSError:
            pass
        pp = target.proxy_protocol or self.rt.rule.proxy_protocol
        prelude = self.prelude
        if pp:
            from portunus.shard.proxyproto import build_header

            try:
                src = self.downstream.getpeername()[:2]
                dst = self.downstream.getsockname()[:2]
                prelude = build_header(pp, src, dst, "tcp") + prelude
            except (OSError, ValueError) as exc:
                log_throttled(
                    "proxy_protocol.failed", level="warning", rule=self.rt.rule.id, error=str(exc)
                )
                self.close()
                return
        if prelude:
            self.prelude = prelude
            self.write_prelude()
        else:
            self.start_pumps()

    def write_prelude(self) -> None:
        up = self.upstream
        assert up is not None
        while self.prelude:
            try:
                n = up.send(self.prelude)
            except (BlockingIOError, InterruptedError):
                self.ctx.loop.add_writer(up.fileno(), self._prelude_writable)
                return
            except OSError:
                self.close()
                return
            self.prelude = self.prelude[n:]
        self.start_pumps()

    def _prelude_writable(self) -> None:
        assert self.upstream is not None
        self.ctx.loop.remove_writer(self.upstream.fileno())
        self.write_prelude()

    def start_pumps(self) -> None:
        up = self.upstream
        assert up is not None
        loop = self.ctx.loop
        acc = self.account
        splice = HAVE_SPLICE and self.ctx.use_splice
        lim_in, lim_out = self.rt.limiter_in, self.rt.limiter_out
        a: Any
        b: Any
        if splice and lim_in is None and lim_out is None:
            native = self.ctx.native
            # An owned rule's relays stay where repace_rule can reach them: an owner
            # cap set later must pace open connections too (docs/owner-caps.md).
            # A rule with idle_timeout_secs stays too: idle_check reads the pumps'
            # counters, and the native relay keeps no idle clock.
            if (
                native is not None
                and self.rt.owner_limits is None
                and self.rt.rule.idle_timeout_secs is None
            ):
                self._to_native(native)
                return
            # The plain relay: both directions spliced in the shard's edge-triggered
            # poller.  The downstream socket joins it now: registering reports the bytes it
            # already sent as the first edge.
            after = self.ctx.splice_after
            a = SplicePump(
                loop, self.downstream, up, self, acc.add_in, self.ctx.pipes, splice_after=after
            )
            b = SplicePump(
                loop, up, self.downstream, self, acc.add_out, self.ctx.pipes, splice_after=after
            )
            a.peer, b.peer = b, a
            b.on_event(self.up_events & IN_BITS)  # what the upstream reported before now
            poller = self.ctx.poller
            poller.retarget(up.fileno(), b.on_event)
            poller.register(self.downstream.fileno(), a.on_event)
        else:
            # A capped direction is paced in userspace (CopyPump); the other one keeps
            # splice.  Both use the loop's level-triggered readers from here.
            self.ctx.poller.unregister(up.fileno())
            a = self._level_pump(self.downstream, up, acc.add_in, lim_in, splice)
            b = self._level_pump(up, self.downstream, acc.add_out, lim_out, splice)
        self.pumps = (a, b)
        a.start()
        b.start()

    def _to_native(self, native: Any) -> None:
        """Hand both sockets to the native relay (native.py); it reports bytes and the close."""
        up = self.upstream
        assert up is not None
        self.ctx.poller.unregister(up.fileno())
        self.upstream = None
        cfd, ufd = self.downstream.detach(), up.detach()
        try:
            self.native = native.add(self, cfd, ufd)
        except OSError as exc:
            os.close(cfd)
            os.close(ufd)
            log_throttled("tcp.native_failed", level="error", rule=self.rt.rule.id, error=str(exc))
            self.close()

    def native_closed(self) -> None:
        """The native relay closed both sockets (EOF both ways or an error)."""
        self.native = None
        self.close()

    def _level_pump(
        self, src: socket.socket, dst: socket.socket, account: Any, limiter: Any, splice: bool
    ) -> Any:
        if splice and limiter is None:
            pump = SplicePump(
                self.ctx.loop,
                src,
                dst,
                self,
                account,
                self.ctx.pipes,
                splice_after=self.ctx.splice_after,
            )
            pump.et = False  # loop readers, not the poller: its peer is a CopyPump
            return pump
        return CopyPump(self.ctx.loop, src, dst, self, account, limiter)

    def idle_check(self, now: float, idle_secs: float) -> None:
        """Close this connection when no byte moved either way for ``idle_secs``
        (the rule's idle_timeout_secs; RuleRuntime sweeps).  A connection still
        connecting is left to the connect timeout."""
        if self.closed or self.pumps is None:
            return
        a, b = self.pumps
        sig = (a.unflushed, a.flushes, b.unflushed, b.flushes)
        if sig != self.idle_sig:
            self.idle_sig, self.idle_since = sig, now
            return
        if now - self.idle_since >= idle_secs:
            log_throttled("tcp.idle_timeout", rule=self.rt.rule.id, idle_secs=idle_secs)
            self.close()

    def pump_done(self, pump: Any) -> None:
        assert self.pumps is not None
        if self.pumps[0].done and self.pumps[1].done:
            self.close()

    def pump_failed(self, pump: Any, exc: BaseException | None) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.ctx.loop
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.native is not None:
            handle, self.native = self.native, None
            din, dout = self.ctx.native.close(handle)
            if din:
                self.account.add_in(din)
            if dout:
                self.account.add_out(dout)
        if self.pumps is not None:
            for p in self.pumps:
                p.close()
                p.done = (
                    True  # a rate-limit resume timer may still be pending: it must not restart it
                )
        poller = self.ctx.poller
        up = self.upstream
        if up is not None:
            if self.pumps is None:
                try:
                    loop.remove_writer(up.fileno())  # a prelude still being written
                except (ValueError, OSError):
                    pass
            poller.forget(up.fileno())
            up.close()
            self.upstream = None
        poller.forget(self.downstream.fileno())
        self.downstream.close()
        self.account.closed()
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        self.rt.conns.discard(self)
        if self.rt.draining and not self.rt.conns:
            self.ctx.rule_drained(self.rt)


def accept_batch(ctx: ShardContext, lsock: socket.socket) -> list[socket.socket]:
    """Accept up to ACCEPT_BATCH pending connections from a listening socket."""
    out: list[socket.socket] = []
    # socket.accept() converts family and type to enums on every call; _accept() plus
    # the constructor with the listener's values is ~0.7 µs cheaper per connection.
    accept = lsock._accept  # type: ignore[attr-defined]  # CPython private, not in typeshed
    family, proto = lsock.family, lsock.proto
    for _ in range(ACCEPT_BATCH):
        try:
            fd, _addr = accept()
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of fds: leave the rest in the kernel queue and back off briefly.
                ctx.accept_backoff(lsock)
                log_throttled("tcp.accept_error", level="error", error=str(exc))
            break
        conn = socket.socket(family, socket.SOCK_STREAM, proto, fd)
        conn.setblocking(
            False
        )  # TCP_NODELAY is inherited from the listener (supervisor/listeners.py)
        out.append(conn)
    return out


class PlainTcpHandler:
    """Serves one TCP port of one rule."""

    __slots__ = ("ctx", "rt", "port_index")

    def __init__(self, ctx: ShardContext, rt: RuleRuntime, port_index: int) -> None:
        self.ctx = ctx
        self.rt = rt
        self.port_index = port_index

    def on_accept(self, lsock: socket.socket) -> None:
        for conn in accept_batch(self.ctx, lsock):
            if not self.rt.admit():
                conn.close()
                continue
            TcpConnection(self.ctx, self.rt, conn, self.port_index).start()
