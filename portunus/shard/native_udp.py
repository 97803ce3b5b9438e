"""A plain UDP port served by the native relay (``relay_udp.c``).

For a UDP rule with no rate limit, no owner and only IP-address targets, no
datagram needs the interpreter: the listening socket and each flow's upstream
socket are readers on the shard's loop whose callbacks are the relay's C
methods.  They read with ``recvmmsg`` (``recvmsg`` while datagrams come one at
a time), keep one connected upstream socket per client flow, send with
``sendmmsg`` (or ``send``/``sendto``) both ways, fall through to the next
candidate on an ICMP error and close flows idle for the rule's
``idle_timeout_secs`` (else ``udp_flow_idle_secs``).  Python keeps what needs a
decision or a metric:

- a datagram from a new client asks ``admit_flow()`` once: the rule draining,
  the rule's ``udp_max_flows`` across shards (``udp_budget``), the overflow count
  and the open-flow metrics, exactly as ``UdpService.open_flow`` does;
- ``report()`` gets the port's counts at most 100 ms late (at once, from the
  callback, when flows closed or a target answered or failed) and makes the
  same Prometheus updates, health bookkeeping and log lines as the Python path
  (``udp.py``).

The port's open flows appear in ``rt.conns`` as one ``NativeFlows`` entry while
there are any, so draining and a rule update treat them like Python flows.
Closing the handler closes its flows, as ``UdpService.close`` does.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING, Any

from portunus.logs import log_throttled
from portunus.shard.udp import DROP_LOG_SECS, UdpPort
from portunus.shard.udp_budget import acquire_budget, release_budget

if TYPE_CHECKING:
    from portunus.shard.runtime import RuleRuntime, ShardContext


def eligible(ctx: ShardContext, rt: RuleRuntime) -> bool:
    """Can this rule's UDP ports run natively?  Anything else keeps ``udp.py``."""
    return (
        ctx.native_type is not None
        and rt.limits is None
        # An owner's caps (docs/owner-caps.md) may be set at any time and must gate
        # and pace every flow, which the native relay does not do.
        and rt.owner_limits is None
        and rt.limiter_in is None
        and rt.limiter_out is None
        # A target given by name is resolved when a flow falls through to it (udp.py).
        and rt.all_literal
    )


def idle_secs(settings: dict[str, Any], rule_idle: float | None) -> float:
    """The rule's idle_timeout_secs, else udp_flow_idle_secs (as ``udp._sweep_timing``)."""
    if rule_idle is not None:
        return float(rule_idle)
    return max(0.0, float(settings.get("udp_flow_idle_secs", 60.0)))


class NativeFlows:
    """Stands for a port's open native flows in ``rt.conns``."""

    __slots__ = ("handler", "rt")

    def __init__(self, handler: NativeUdpHandler, rt: RuleRuntime) -> None:
        self.handler = handler
        self.rt = rt  # Shard.upsert re-points this when the rule is updated

    def close(self) -> None:
        self.handler.close_flows()


class NativeUdpHandler(UdpPort):
    """Serves one UDP port of one rule in the native relay."""

    def __init__(
        self, ctx: ShardContext, rt: RuleRuntime, sock: socket.socket, port_index: int
    ) -> None:
        super().__init__(ctx, rt, sock, port_index)
        self.targets = list(rt.rule.targets)
        self.flows = NativeFlows(self, rt)
        self.handle: int | None = None
        self.budget = None
        self.live = 0
        self.dropped = 0
        self.last_drop_log = -DROP_LOG_SECS
        self.closed = False

    def candidates(self) -> list[tuple[str, int, int]]:
        index = {t: i for i, t in enumerate(self.targets)}
        return [(ip, t.port + self.port_index, index[t]) for t, ip in self.rt.candidates()]

    def start(self) -> None:
        self.budget = acquire_budget(self.ctx.settings, self.rt.rule.client, self.rt.rule.id)
        self.handle = self.ctx.native.relay.udp_listen(
            self.sock.fileno(),
            self,
            len(self.targets),
            self.candidates(),
            idle_secs(self.ctx.settings, self.rt.rule.idle_timeout_secs),
            self.ctx.loop,
        )
        self.rt.on_targets.append(self.refresh)

    def refresh(self) -> None:
        """A target went up or down: new flows take the new candidate order."""
        if self.handle is not None:
            self.ctx.native.relay.udp_set_candidates(self.handle, self.candidates())

    def retune(self) -> None:
        """A reload changed udp_flow_idle_secs / udp_max_flows: apply them now."""
        if self.handle is not None:
            self.ctx.native.relay.udp_set_idle(
                self.handle, idle_secs(self.ctx.settings, self.rt.rule.idle_timeout_secs)
            )
        self.retune_budget()

    def flow_addrs(self) -> list[tuple[str, int]]:
        """The clients with an open flow, least recently active first."""
        if self.handle is None:
            return []
        return [(str(h), int(p)) for h, p in self.ctx.native.relay.udp_flows(self.handle)]

    # ------------------------------------------------------ called by the relay

    def admit_flow(self) -> bool:
        """A datagram from a new client: admit a flow (and count it) or refuse it.

        Runs inside ``Relay.poll()``; the same checks and counts as
        ``UdpService.open_flow``.
        """
        rt = self.flows.rt
        if self.closed or not rt.admit():
            return False
        budget = self.budget
        if budget is None or not budget.try_acquire():
            self.m_overflow.inc()
            return False
        self.account.opened()
        self.m_flows.inc()
        self.live += 1
        if self.flows not in rt.conns:
            rt.conns.add(self.flows)
        return True

    def report(
        self,
        closed: int,
        bytes_in: int,
        bytes_out: int,
        dgrams_in: int,
        dgrams_out: int,
        dropped: int,
        connect_failures: int,
        ok: tuple[int, ...],
        failed: tuple[int, ...],
        errs: tuple[int, ...],
        live: int,
        sock_errno: int,
        recv_errno: int,
    ) -> None:
        """One batch of what the native relay did for this port (native.py dispatch)."""
        acc = self.account
        if bytes_in:
            acc.add_in(bytes_in)
        if bytes_out:
            acc.add_out(bytes_out)
        if dgrams_in:
            self.m_dgrams_in.inc(dgrams_in)
        if dgrams_out:
            self.m_dgrams_out.inc(dgrams_out)
        rt = self.flows.rt
        for i, n in enumerate(failed):
            if n:
                self._target_failed(rt, i, n, errs[i])
        for i, n in enumerate(ok):
            for _ in range(n):
                rt.target_connected(self.targets[i])
        if connect_failures:
            rt.meters.connect_failures.inc(connect_failures)
        if sock_errno:
            log_throttled(
                "udp.socket_failed", level="error", rule=rt.rule.id, error=os.strerror(sock_errno)
            )
        if recv_errno:
            log_throttled(
                "udp.recv_failed", level="warning", rule=rt.rule.id, error=os.strerror(recv_errno)
            )
        if dropped:
            self._log_drops(dropped)
        for _ in range(closed):
            self._flow_closed()
        self.live = live
        if not live and self.flows in rt.conns:
            rt.conns.discard(self.flows)
            if rt.draining and not rt.conns:
                self.ctx.rule_drained(rt)

    def _target_failed(self, rt: RuleRuntime, i: int, n: int, err: int) -> None:
        target = self.targets[i]
        if err != errno.ECONNREFUSED:  # a connect() refusal; ICMP ones are silent in udp.py
            host = target.host
            log_throttled(
                "udp.connect_failed",
                level="warning",
                rule=rt.rule.id,
                target=f"{host}:{target.port + self.port_index}",
                error=os.strerror(err),
            )
        for _ in range(n):  # health counts consecutive failures one by one
            rt.target_failed(target)

    def _flow_closed(self) -> None:
        if self.budget is not None:
            self.budget.release()
        self.account.closed()
        self.m_flows.dec()

    def _log_drops(self, n: int) -> None:
        self.dropped += n
        self.log_drops()

    # ---------------------------------------------------------------- closing

    def close_flows(self) -> None:
        """Close every open flow now (drain timeout, shard stop), as ``rt.close_all``
        does to Python flows; the port keeps serving (a draining rule admits none)."""
        if self.handle is not None:
            self.report(*self.ctx.native.relay.udp_close_flows(self.handle)[1:])

    def close(self) -> None:
        """Close every flow, stop reading the port (the socket stays the shard's)."""
        if self.closed:
            return
        self.closed = True
        if self.refresh in self.rt.on_targets:
            self.rt.on_targets.remove(self.refresh)
        handle, self.handle = self.handle, None
        if handle is not None:
            self.report(*self.ctx.native.relay.udp_close(handle)[1:])
        if self.budget is not None:
            release_budget(self.budget)
            self.budget = None
