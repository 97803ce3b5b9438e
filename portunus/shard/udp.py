"""UDP forwarding inside a shard: one upstream socket per client flow.

The shard's SO_REUSEPORT listening socket receives datagrams from many clients;
the kernel hashes each client's 4-tuple to one shard, so a flow lives in exactly
one shard.  Per client ``(addr, port)`` a ``UdpFlow`` holds one connected
upstream socket: client datagrams go out with ``send``, the target's replies come
back on that socket and leave through the listening socket with ``sendto``, so
the client sees them from the port it talked to.

Everything is callback-driven (no task per datagram or per flow): readers drain
up to ``BATCH`` datagrams per wakeup into one preallocated buffer per loop.
Byte and datagram counts accumulate in plain ints on the service and reach
Prometheus once per sweep tick (at most a second) and at close.  One timer per
service sweeps idle flows.  A full socket buffer drops the datagram (UDP
semantics) instead of queueing it.  ``udp_max_flows`` holds for the rule across
all shards (see ``udp_budget``).
"""

from __future__ import annotations

import math
import socket
import weakref
from typing import TYPE_CHECKING, Any

from portunus.logs import log_event, log_throttled
from portunus.shard import metrics as m
from portunus.shard.udp_budget import FlowBudget, acquire_budget, release_budget

if TYPE_CHECKING:
    import asyncio

    from portunus.rules import Target
    from portunus.shard.runtime import PortAccount, RuleRuntime, ShardContext

BATCH = 64  # datagrams per socket per wakeup: fairness between flows and ports
BUFFER_SIZE = 65536  # the largest UDP payload fits
PENDING_MAX = 8  # datagrams kept per flow while its target name resolves
DROP_LOG_SECS = 10.0

# One receive buffer per event loop: every callback copies out of it before it
# returns, and a loop runs one callback at a time, so all services can share it.
_BUFFERS: weakref.WeakKeyDictionary[Any, memoryview] = weakref.WeakKeyDictionary()


def _buffer_for(loop: Any) -> memoryview:
    view = _BUFFERS.get(loop)
    if view is None:
        view = memoryview(bytearray(BUFFER_SIZE))
        _BUFFERS[loop] = view
    return view


class UdpFlow:
    """One client (addr, port) of one UDP port: its upstream socket and state."""

    __slots__ = (
        "svc",
        "rt",
        "addr",
        "sock",
        "fd",
        "target",
        "candidates",
        "pos",
        "seen",
        "last",
        "confirmed",
        "pending",
        "closed",
        "slot",
    )

    def __init__(self, svc: UdpService, addr: Any) -> None:
        self.svc = svc
        self.rt: RuleRuntime = svc.rt
        self.addr = addr
        self.sock: socket.socket | None = None
        self.fd = -1
        self.target: Target | None = None
        self.candidates: list[tuple[Target, str]] = []
        self.pos = 0
        self.seen = svc.epoch
        # The latest client datagram while the target has not answered yet: resent
        # to the next candidate if this one turns out refused (ICMP unreachable).
        self.last: bytes | None = None
        self.confirmed = False
        self.pending: list[bytes] | None = None
        self.closed = False
        self.slot, svc.rt.slot = svc.rt.slot, None  # taken by rt.admit() just before (rate limits)

    # ---------------------------------------------------------------- target

    def start(self) -> None:
        self.candidates = self.rt.candidates()
        self.connect_next()

    async def _resolve_then_connect(self, target: Target) -> None:
        """Replace the unresolved candidate at ``pos`` with its addresses, go on."""
        addrs = await self.rt.resolve(target)
        if self.closed:
            return
        self.candidates[self.pos : self.pos + 1] = [(target, a) for a in addrs]
        if self.connect_next():
            pending, self.pending = self.pending or [], None
            for data in pending:
                self.send_up(data)

    def connect_next(self) -> bool:
        """Open a connected socket to the next candidate; close the flow when none is left.

        False also while the next candidate's name resolves (the flow stays open).
        """
        loop = self.svc.ctx.loop
        port_index = self.svc.port_index
        while self.pos < len(self.candidates):
            target, ip = self.candidates[self.pos]
            if not ip:
                # Queue the client's datagrams (the refused one first) while it resolves.
                if self.pending is None:
                    self.pending = [self.last] if self.last is not None else []
                    self.last = None
                self.svc.ctx.spawn(self._resolve_then_connect(target))
                return False
            self.pos += 1
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            try:
                up = socket.socket(
                    family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
            except OSError as exc:
                log_throttled(
                    "udp.socket_failed", level="error", rule=self.rt.rule.id, error=str(exc)
                )
                break
            try:
                up.connect((ip, target.port + port_index))
            except OSError as exc:
                up.close()
                log_throttled(
                    "udp.connect_failed",
                    level="warning",
                    rule=self.rt.rule.id,
                    target=f"{ip}:{target.port + port_index}",
                    error=str(exc),
                )
                self.rt.target_failed(target)
                continue
            self.sock = up
            self.fd = up.fileno()
            self.target = target
            self.confirmed = False
            loop.add_reader(self.fd, self.on_upstream)
            return True
        self.rt.connect_failed()
        self.close()
        return False

    def send_up(self, data: bytes | memoryview) -> None:
        """Client → target outside the hot loop (queued and resent datagrams)."""
        sock = self.sock
        if sock is None:
            return
        try:
            sock.send(data)
        except (BlockingIOError, InterruptedError):
            self.svc.dropped += 1
            return
        except ConnectionRefusedError:
            self.refused()
            return
        except OSError:
            self.svc.dropped += 1
            return
        self.svc.bytes_in += len(data)
        self.svc.dgrams_in += 1
        if not self.confirmed:
            self.last = bytes(data)

    def refused(self) -> None:
        """The target answered with ICMP port unreachable: UDP's "connect failed".

        The failure is counted against the target; the flow moves to the next
        candidate (resending the datagram that was refused) or ends.
        """
        target = self.target
        self._drop_socket()
        if target is not None:
            nxt = self.candidates[self.pos][0] if self.pos < len(self.candidates) else None
            if nxt is not target:
                self.rt.target_failed(target)
        if self.connect_next() and self.last is not None:
            last, self.last = self.last, None
            self.send_up(last)

    def _drop_socket(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            self.svc.ctx.loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass
        sock.close()
        self.sock = None
        self.fd = -1

    # ----------------------------------------------------------------- relay

    def on_upstream(self) -> None:
        """Target → client: drain a batch of replies back through the listener."""
        sock = self.sock
        if sock is None:
            return
        svc = self.svc
        view = svc.view
        recv = sock.recv_into
        sendto = svc.sock.sendto
        addr = self.addr
        limiter = self.rt.limiter_out
        nbytes = count = 0
        for _ in range(BATCH):
            try:
                n = recv(view)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                self.refused()
                break
            except OSError as exc:
                log_throttled(
                    "udp.recv_failed", level="warning", rule=self.rt.rule.id, error=str(exc)
                )
                self.close()
                break
            if not self.confirmed:
                self.confirmed = True
                self.last = None
                if self.target is not None:
                    self.rt.target_connected(self.target)
            if limiter is not None and not limiter.try_take(n):
                svc.rl_dropped_out += 1
                continue
            try:
                sendto(view[:n], addr)
            except OSError:  # EAGAIN (buffer full) or the client went away: drop
                svc.dropped += 1
                continue
            nbytes += n
            count += 1
        svc.bytes_out += nbytes
        svc.dgrams_out += count
        self.seen = svc.epoch

    def close(self) -> None:
        """End the flow (idle, refused everywhere, or its service closing)."""
        if self.closed:
            return
        self.closed = True
        self._drop_socket()
        self.last = None
        self.pending = None
        svc = self.svc
        if svc.flows.get(self.addr) is self:
            del svc.flows[self.addr]
        svc.flow_closed()
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        rt = self.rt
        rt.conns.discard(self)
        if rt.draining and not rt.conns:
            svc.ctx.rule_drained(rt)


def _sweep_timing(settings: dict[str, Any], rule_idle: float | None = None) -> tuple[float, int]:
    """``(tick secs, ticks until a flow is idle)`` for the rule's idle_timeout_secs,
    else udp_flow_idle_secs: sweep often enough to reap within a quarter of the idle
    time, and at least once a second so counters reach /metrics within a second."""
    idle = (
        rule_idle
        if rule_idle is not None
        else max(0.0, float(settings.get("udp_flow_idle_secs", 60.0)))
    )
    tick = min(1.0, max(0.05, idle / 4))
    return tick, math.ceil(idle / tick)


class UdpPort:
    """What both UDP handlers of one port hold (``UdpService`` in Python,
    ``native_udp.NativeUdpHandler`` in the native relay): the port's account and
    the rule's UDP meters, and the cross-shard flow budget a reload retunes."""

    budget: FlowBudget | None
    dropped: int  # datagrams dropped since the last log line
    last_drop_log: float

    def __init__(
        self, ctx: ShardContext, rt: RuleRuntime, sock: socket.socket, port_index: int
    ) -> None:
        self.ctx = ctx
        self.rt = rt
        self.sock = sock
        self.port_index = port_index
        self.account: PortAccount = rt.accounts[port_index] if rt.accounts else rt.whole
        labels = rt.meters.labels
        self.m_flows = m.UDP_FLOWS.labels(*labels)
        self.m_overflow = m.UDP_OVERFLOW.labels(*labels)
        self.m_dgrams_in = m.DATAGRAMS_IN.labels(*labels)
        self.m_dgrams_out = m.DATAGRAMS_OUT.labels(*labels)

    def log_drops(self) -> None:
        """One warning for the datagrams dropped since the last one, at most every
        DROP_LOG_SECS (the count goes on meanwhile)."""
        now = self.ctx.loop.time()
        if now - self.last_drop_log >= DROP_LOG_SECS:
            self.last_drop_log = now
            log_event(
                "udp.datagrams_dropped",
                level="warning",
                rule=self.rt.rule.id,
                port=self.rt.rule.listen_start + self.port_index,
                count=self.dropped,
                reason="socket buffer full or send error",
            )
            self.dropped = 0

    def retune_budget(self) -> None:
        """Apply a reloaded udp_max_flows to this port's flow budget."""
        if self.budget is not None:
            limit = max(1, int(self.ctx.settings.get("udp_max_flows", 1024)))
            shards = max(1, int(self.ctx.settings.get("shards", 1) or 1))
            self.budget.limit = limit if self.budget.shared else max(1, limit // shards)


class UdpService(UdpPort):
    """Serves one UDP port of one rule in one shard.

    Built by ``Shard._udp_handler``; ``start()`` when it becomes the port's handler,
    ``close()`` when the rule changes, goes away or the shard stops.  The listening
    socket belongs to the shard and is never closed here.
    """

    def __init__(
        self, ctx: ShardContext, rt: RuleRuntime, sock: socket.socket, port_index: int
    ) -> None:
        super().__init__(ctx, rt, sock, port_index)
        self.tick, self.idle_ticks = _sweep_timing(ctx.settings, rt.rule.idle_timeout_secs)
        self.flows: dict[Any, UdpFlow] = {}
        self.view = _buffer_for(ctx.loop)
        self.epoch = 0
        self.bytes_in = self.bytes_out = self.dgrams_in = self.dgrams_out = 0
        self.overflow = 0
        self.dropped = 0
        self.rl_dropped_in = self.rl_dropped_out = 0  # over the rule's bandwidth cap
        self.last_rl_log = -DROP_LOG_SECS
        self.last_drop_log = -DROP_LOG_SECS
        self.budget = None
        self.timer: asyncio.TimerHandle | None = None
        self.reading = False
        self.closed = False

    def retune(self) -> None:
        """A reload changed udp_flow_idle_secs / udp_max_flows: apply them to this
        port now (its flows, sweep and budget), not only to ports started later."""
        self.tick, self.idle_ticks = _sweep_timing(
            self.ctx.settings, self.rt.rule.idle_timeout_secs
        )
        self.retune_budget()

    def start(self) -> None:
        self.budget = acquire_budget(self.ctx.settings, self.rt.rule.client, self.rt.rule.id)
        self.ctx.loop.add_reader(self.sock.fileno(), self.on_client)
        self.reading = True
        self.timer = self.ctx.loop.call_later(self.tick, self.on_tick)

    # ----------------------------------------------------------------- relay

    def on_client(self) -> None:
        """Client → target: drain a batch from the listening socket (hot path)."""
        recvfrom = self.sock.recvfrom_into
        view = self.view
        flows = self.flows
        epoch = self.epoch
        limiter = self.rt.limiter_in
        nbytes = count = 0
        for _ in range(BATCH):
            try:
                n, addr = recvfrom(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # a queued error on the listener: consume it, go on
                continue
            flow = flows.get(addr)
            if flow is None:
                flow = self.open_flow(addr)
                if flow is None:
                    continue
            flow.seen = epoch
            sock = flow.sock
            if sock is None:
                if flow.pending is not None and len(flow.pending) < PENDING_MAX:
                    flow.pending.append(bytes(view[:n]))
                else:
                    self.dropped += 1
                continue
            if limiter is not None and not limiter.try_take(n):
                self.rl_dropped_in += 1
                continue
            try:
                sock.send(view[:n])
            except (BlockingIOError, InterruptedError):
                self.dropped += 1
                continue
            except ConnectionRefusedError:
                # An ICMP error from an earlier datagram surfaced on this send.
                flow.last = bytes(view[:n])
                flow.refused()
                continue
            except OSError:
                self.dropped += 1
                continue
            nbytes += n
            count += 1
            if not flow.confirmed:
                flow.last = bytes(view[:n])
        self.bytes_in += nbytes
        self.dgrams_in += count

    def open_flow(self, addr: Any) -> UdpFlow | None:
        """A datagram from a new client: admit a flow or drop (and count) it."""
        rt = self.rt
        if self.closed or not rt.admit():
            return None
        budget = self.budget
        if budget is None or not budget.try_acquire():
            self.overflow += 1
            if rt.slot is not None:
                rt.slot.release()
                rt.slot = None
            return None
        flow = UdpFlow(self, addr)
        self.flows[addr] = flow
        rt.conns.add(flow)
        self.account.opened()
        self.m_flows.inc()
        flow.start()
        return None if flow.closed else flow

    def flow_closed(self) -> None:
        """Bookkeeping for a flow that just closed (called by ``UdpFlow.close``)."""
        if self.budget is not None:
            self.budget.release()
        self.account.closed()
        self.m_flows.dec()

    # ----------------------------------------------------------- maintenance

    def on_tick(self) -> None:
        """Once per tick: publish counters, reap flows idle for udp_flow_idle_secs."""
        self.timer = None
        if self.closed:
            return
        self.epoch += 1
        horizon = self.epoch - self.idle_ticks
        idle = [f for f in self.flows.values() if f.seen < horizon]
        for flow in idle:
            flow.close()
        self.flush()
        self.timer = self.ctx.loop.call_later(self.tick, self.on_tick)

    def flush(self) -> None:
        """Move the locally accumulated counts into the shared Prometheus values."""
        if self.bytes_in:
            self.account.add_in(self.bytes_in)
            self.bytes_in = 0
        if self.bytes_out:
            self.account.add_out(self.bytes_out)
            self.bytes_out = 0
        if self.dgrams_in:
            self.m_dgrams_in.inc(self.dgrams_in)
            self.dgrams_in = 0
        if self.dgrams_out:
            self.m_dgrams_out.inc(self.dgrams_out)
            self.dgrams_out = 0
        if self.overflow:
            self.m_overflow.inc(self.overflow)
            self.overflow = 0
        if self.rl_dropped_in or self.rl_dropped_out:
            self.flush_rate_drops()
        if self.dropped:
            self.log_drops()

    def flush_rate_drops(self) -> None:
        """Datagrams dropped over the bandwidth cap: counted, logged at most every DROP_LOG_SECS."""
        from portunus.shard.ratelimit import DROPPED

        labels = self.rt.meters.labels
        for direction, n in (("in", self.rl_dropped_in), ("out", self.rl_dropped_out)):
            if n:
                DROPPED.labels(*labels, direction).inc(n)
        now = self.ctx.loop.time()
        if now - self.last_rl_log >= DROP_LOG_SECS:
            self.last_rl_log = now
            log_event(
                "rate_limit.datagrams_dropped",
                level="warning",
                rule=self.rt.rule.id,
                port=self.rt.rule.listen_start + self.port_index,
                dropped_in=self.rl_dropped_in,
                dropped_out=self.rl_dropped_out,
            )
        self.rl_dropped_in = self.rl_dropped_out = 0

    def close(self) -> None:
        """Stop reading, close every flow, publish the last counts.  Keeps the listener."""
        if self.closed:
            return
        self.closed = True
        if self.reading:
            self.reading = False
            try:
                self.ctx.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for flow in list(self.flows.values()):
            flow.close()
        self.flush()
        if self.budget is not None:
            release_budget(self.budget)
            self.budget = None
