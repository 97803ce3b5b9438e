"""Per-shard state: the rules a shard serves and what it shares across them.

``RuleRuntime`` is one rule as seen by one shard: its meters, its open
connections (so a removed rule can drain), its failover state and its optional
rate limiters.  ``ShardContext`` holds what every connection needs from the shard
(loop, pipe pool, resolver, timeouts) so that connection objects stay small.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any

from portunus.logs import log_event, log_throttled
from portunus.rules import Rule, Target
from portunus.shard import metrics as m
from portunus.shard.native import load as native_load
from portunus.shard.pumps import SPLICE_AFTER, PipePool
from portunus.shard.sni import CLIENT_HELLO_TIMEOUT_SECS
from portunus.shard.targets import is_ip

RESET_SWEEP_SECS = 1.0


class PortAccount:
    """Byte and connection accounting for one port of a rule (or the whole rule)."""

    __slots__ = ("rule", "port")

    def __init__(self, rule: m.RuleMeters, port: m.PortMeters | None) -> None:
        self.rule = rule
        self.port = port

    def add_in(self, n: int) -> None:
        self.rule.bytes_in.inc(n)
        if self.port is not None:
            self.port.bytes_in.inc(n)

    def add_out(self, n: int) -> None:
        self.rule.bytes_out.inc(n)
        if self.port is not None:
            self.port.bytes_out.inc(n)

    def opened(self) -> None:
        self.rule.connections.inc()
        self.rule.active.inc()
        if self.port is not None:
            self.port.connections.inc()
            self.port.active.inc()

    def closed(self) -> None:
        self.rule.active.dec()
        if self.port is not None:
            self.port.active.dec()


class RuleRuntime:
    """One rule inside one shard."""

    def __init__(self, ctx: ShardContext, rule: Rule) -> None:
        self.ctx = ctx
        self.rule = rule
        self.meters = m.RuleMeters(rule.client, rule.id, rule.owner)
        self.whole = PortAccount(self.meters, None)
        self.accounts: list[PortAccount] = []
        if rule.is_range:
            self.accounts = [
                PortAccount(self.meters, m.PortMeters(rule.client, rule.id, p)) for p in rule.ports
            ]
        self.conns: set[Any] = set()
        self.draining = False
        self.all_literal = all(is_ip(t.host) for t in rule.targets)
        self.target_set: Any = None
        self.on_targets: list[Any] = []  # called when a target goes up or down
        self.health_task: asyncio.Task[None] | None = None
        self.limiter_in: Any = None
        self.limiter_out: Any = None
        self.limits: Any = None  # ratelimit.RuleLimits while the rule has a rate_limit
        # owner_limits.OwnerLimits of the rule's owner (None without an owner), and
        # the same object as owner_gate while the owner caps connections.
        self.owner_limits: Any = ctx.owners.get(rule.owner) if rule.owner else None
        self.owner_gate: Any = None
        self.sweep: asyncio.TimerHandle | None = None
        self.slot: Any = None  # live-connection budget a just-admitted connection releases into
        self.extra: dict[str, Any] = {}
        self.target_meters: dict[Target, Any] = {}  # labels() is not free: once per target
        self.idle_timer: asyncio.TimerHandle | None = None
        if rule.idle_timeout_secs is not None and rule.protocol == "tcp":
            self.idle_timer = ctx.loop.call_later(self._idle_tick(), self._sweep_idle)
        self._setup_targets()
        if rule.rate_limit:
            self._setup_limits()
        elif self.owner_limits is not None and self.owner_limits.capped:
            self.refresh_limits()

    def _setup_targets(self) -> None:
        rule = self.rule
        for t in rule.targets:
            m.TARGET_UP.labels(rule.client, rule.id, t.label).set(1)
        if len(rule.targets) > 1:
            try:
                from portunus.shard.targets import TargetSet, weak_hook
            except ImportError:
                return
            self.target_set = TargetSet(rule.targets, on_change=weak_hook(self._target_changed))

    def _setup_limits(self) -> None:
        from portunus.shard.ratelimit import acquire_limits

        rule = self.rule
        assert rule.rate_limit is not None
        self.limits = acquire_limits(
            self.ctx.settings, rule.client, rule.id, self.meters.labels, rule.rate_limit
        )
        self.refresh_limits()

    def refresh_limits(self) -> None:
        """Pick the limiters new connections use: the rule's own buckets, or pacers
        over the rule's and its owner's (docs/owner-caps.md).  Runs at setup and
        whenever the owner's caps change (``Shard.owner_caps``)."""
        rule, owner = self.limits, self.owner_limits
        if owner is None:
            self.limiter_in = rule.bw_in if rule is not None else None
            self.limiter_out = rule.bw_out if rule is not None else None
        else:
            # A pacer even while the owner is uncapped: a cap set later reaches
            # the rule's open paced connections too.
            from portunus.shard.owner_limits import Pacer

            self.owner_gate = owner if owner.capped and owner.gates_admission else None
            has_in = owner.bw_in is not None or (rule is not None and rule.bw_in is not None)
            has_out = owner.bw_out is not None or (rule is not None and rule.bw_out is not None)
            self.limiter_in = Pacer(rule, owner, "bw_in") if has_in else None
            self.limiter_out = Pacer(rule, owner, "bw_out") if has_out else None
        paced = self.limiter_in is not None or self.limiter_out is not None
        if paced and self.sweep is None:
            self.sweep = self.ctx.loop.call_later(RESET_SWEEP_SECS, self._sweep_resets)

    def _sweep_resets(self) -> None:
        """Close paced connections whose socket holds an error (a peer's reset).

        libuv stops a poll handle when epoll reports EPOLLERR and uvloop then drops
        the reader without a word, so a reset that lands while a paced pump still
        has bytes queued to read would leave the connection (and its upstream) open
        for ever.  Paced pumps always have bytes queued: once a second is cheap here.
        """
        self.sweep = None
        if self.limiter_in is None and self.limiter_out is None:
            return
        for conn in list(self.conns):
            if getattr(conn, "pumps", None) is None or conn.closed:
                continue
            for sock in (conn.downstream, conn.upstream):
                try:
                    err = (
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if sock is not None
                        else 0
                    )
                except OSError:
                    err = 0
                if err:
                    conn.close()
                    break
        self.sweep = self.ctx.loop.call_later(RESET_SWEEP_SECS, self._sweep_resets)

    def release_limits(self) -> None:
        """Give the limiters back (once): when replaced by an update, or once drained."""
        if self.limits is not None:
            from portunus.shard.ratelimit import release_limits

            limits, self.limits = self.limits, None
            release_limits(limits)
        self.limiter_in = self.limiter_out = self.owner_gate = None
        if self.sweep is not None:
            self.sweep.cancel()
            self.sweep = None

    def _target_changed(self, target: Target, up: bool) -> None:
        m.TARGET_UP.labels(self.rule.client, self.rule.id, target.label).set(1 if up else 0)
        for hook in self.on_targets:
            hook()  # native listeners take the new candidate order (native_tcp.py)
        log_event(
            "target.up" if up else "target.down",
            level="info" if up else "warning",
            rule=self.rule.id,
            target=target.label,
        )
        if not up:
            self.ensure_health_loop()

    def ensure_health_loop(self) -> None:
        if self.target_set is None or (self.health_task and not self.health_task.done()):
            return
        self.health_task = self.ctx.spawn(
            self.target_set.health_loop(self.rule.health_check_interval_secs, self._probe)
        )

    async def _probe(self, target: Target) -> bool:
        from portunus.shard.targets import tcp_probe

        try:
            addrs = (
                [target.host]
                if is_ip(target.host)
                else await self.ctx.resolver.resolve(target.host, self.rule.prefer_ipv6)
            )
        except Exception:  # noqa: BLE001
            return False
        return await tcp_probe(addrs, target.port, self.ctx.connect_timeout)

    # ---- hooks called by connections

    def admit(self) -> bool:
        """Admission control for a new connection or UDP flow.

        With a rate limit, an admitted connection must take ``self.slot`` right
        away (same callback) and ``release()`` it when it closes.
        """
        if self.draining:
            return False
        if self.owner_gate is None:
            if self.limits is None:
                self.slot = None
                return True
            ok, self.slot = self.limits.admit()
            return ok
        from portunus.shard.owner_limits import admit_both

        ok, self.slot = admit_both(self.limits, self.owner_gate, self.meters.labels)
        return ok

    def target_connected(self, target: Target) -> None:
        child = self.target_meters.get(target)
        if child is None:
            child = m.TARGET_CONNECTIONS.labels(self.rule.client, self.rule.id, target.label)
            self.target_meters[target] = child
        child.inc()
        if self.target_set is not None:
            self.target_set.report_success(target)

    def target_failed(self, target: Target) -> None:
        m.TARGET_FAILURES.labels(self.rule.client, self.rule.id, target.label).inc()
        if self.target_set is not None:
            self.target_set.report_failure(target)

    def connect_failed(self) -> None:
        self.meters.connect_failures.inc()

    def candidates(self) -> list[tuple[Target, str]]:
        """(target, address) in the order a new connection or flow tries them.

        A name gets the address "" and is resolved only when the connection falls
        through to it (``resolve``): a healthy primary never waits for a backup's DNS.
        """
        targets = self.target_set.candidates() if self.target_set else list(self.rule.targets)
        if self.all_literal:
            return [(t, t.host) for t in targets]
        return [(t, t.host if is_ip(t.host) else "") for t in targets]

    async def resolve(self, target: Target) -> list[str]:
        """The addresses of a named target; [] (counted and logged) when the lookup fails."""
        try:
            return await self.ctx.resolver.resolve(target.host, self.rule.prefer_ipv6)
        except Exception as exc:  # noqa: BLE001 - ResolveError or anything the resolver hit
            self.dns_failed(target.host, exc)
            return []

    def dns_failed(self, host: str, exc: BaseException) -> None:
        m.DNS_FAILURES.labels(self.rule.client, self.rule.id).inc()
        log_throttled(
            "dns.resolve_failed", level="warning", rule=self.rule.id, host=host, error=str(exc)
        )

    def _idle_tick(self) -> float:
        idle = self.rule.idle_timeout_secs or 1.0
        return min(1.0, max(0.05, idle / 4))

    def _sweep_idle(self) -> None:
        """Close this rule's TCP connections idle for idle_timeout_secs (a peer that
        vanished without a FIN or RST would otherwise hold them for ever)."""
        self.idle_timer = None
        idle = self.rule.idle_timeout_secs
        if idle is None or (self.draining and not self.conns):
            return
        now = self.ctx.loop.time()
        for conn in list(self.conns):
            check = getattr(conn, "idle_check", None)
            if check is not None:
                check(now, idle)
        self.idle_timer = self.ctx.loop.call_later(self._idle_tick(), self._sweep_idle)

    def stop(self) -> None:
        if self.health_task is not None:
            self.health_task.cancel()
            self.health_task = None
        if self.idle_timer is not None and not self.draining:
            # Replaced by an update: the new runtime sweeps the connections it took over.
            self.idle_timer.cancel()
            self.idle_timer = None
        # A draining rule keeps pacing its open connections until they are gone.
        if not self.draining or not self.conns:
            self.release_limits()

    def close_all(self) -> None:
        for conn in list(self.conns):
            conn.close()


class ShardContext:
    """What connections need from their shard, in one small object."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: dict[str, Any]) -> None:
        self.loop = loop
        self.settings = settings
        self.connect_timeout = float(settings.get("connect_timeout_secs", 5.0))
        self.client_hello_timeout = float(
            settings.get("sni_client_hello_timeout_secs", CLIENT_HELLO_TIMEOUT_SECS)
        )
        self.use_splice = bool(settings.get("use_splice", True))
        self.pipes = PipePool()
        # Bytes a spliced relay copies one way before it takes a pipe (pumps.py).
        self.splice_after = int(settings.get("splice_after", SPLICE_AFTER))
        # The native relay (native.py): the type, or None with the reason (None = off on purpose).
        native: tuple[Any, str | None] = (
            native_load() if settings.get("native", True) else (None, None)
        )
        self.native_type, self.native_why = native
        self._native: Any = None
        self._resolver: Any = None
        self._poller: Any = None
        self._owners: Any = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.on_drained: Any = None
        self.on_accept_backoff: Any = None

    @property
    def resolver(self) -> Any:
        if self._resolver is None:
            from portunus.shard.dns import Resolver

            self._resolver = Resolver()
        return self._resolver

    @property
    def owners(self) -> Any:
        """The shard's owner caps (owner_limits.OwnerTable), made on first use."""
        if self._owners is None:
            from portunus.shard.owner_limits import OwnerTable

            self._owners = OwnerTable(self.settings)
        return self._owners

    @property
    def poller(self) -> Any:
        """The shard's edge-triggered epoll set for spliced relays (poller.py)."""
        if self._poller is None:
            from portunus.shard.poller import Poller

            self._poller = Poller(self.loop)
        return self._poller

    @property
    def native(self) -> Any:
        """The shard's native relay (native.py), or None when it is off or missing."""
        if self._native is None and self.native_type is not None:
            from portunus.shard.native import NativeRelay

            self._native = NativeRelay(self.loop, self.native_type, self.splice_after)
        return self._native

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def rule_drained(self, rt: RuleRuntime) -> None:
        rt.release_limits()
        if self.on_drained is not None:
            self.on_drained(rt)

    def accept_backoff(self, lsock: Any) -> None:
        if self.on_accept_backoff is not None:
            self.on_accept_backoff(lsock)
