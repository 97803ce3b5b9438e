"""The shard process: one uvloop event loop serving the sockets it is handed.

A shard owns no sockets of its own: the supervisor sends it listening fds and
the rule table over a framed channel (ipc/messages.py: ``config``, ``listeners``,
``rules``, ``owner_caps``).  It answers with ``ready``, ``drained`` (when a removed
rule's last connection closed) and a ``heartbeat`` every second from the loop
itself, so a wedged loop is noticed.  SIGTERM = stop accepting, drain, exit 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from typing import Any

from portunus.ipc.framing import Channel, ProtocolError, close_fds
from portunus.ipc.messages import (
    Config,
    Drained,
    Heartbeat,
    Listeners,
    Message,
    OwnerCaps,
    Ready,
    Rules,
    tag,
)
from portunus.logs import configure as configure_logs
from portunus.logs import flush_throttled, log_event
from portunus.rules import Rule
from portunus.shard import metrics as m
from portunus.shard.native import announce as announce_native
from portunus.shard.native_tcp import NativeTcpHandler
from portunus.shard.native_tcp import eligible as native_eligible
from portunus.shard.native_udp import eligible as native_udp_eligible
from portunus.shard.repace import repace_rule
from portunus.shard.runtime import RuleRuntime, ShardContext
from portunus.shard.sni import CLIENT_HELLO_TIMEOUT_SECS
from portunus.shard.tcp import PlainTcpHandler

HEARTBEAT_SECS = 1.0
# Named exit codes the supervisor understands.
SHARD_OK = 0
SHARD_BOOT_ERROR = 3
SHARD_LOST_SUPERVISOR = 4


class Shard:
    def __init__(self, index: int, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.index = index
        self.loop = loop
        self.channel = Channel(sock)
        self.ctx = ShardContext(loop, {})
        announce_native(index, self.ctx.native_why)
        self.ctx.on_drained = self._rule_drained
        self.ctx.on_accept_backoff = self._accept_backoff
        self.listeners: dict[str, socket.socket] = {}
        self.handlers: dict[str, Any] = {}  # key -> handler (identity tracks changes)
        self.handler_sig: dict[str, Any] = {}
        self.rules: dict[str, RuleRuntime] = {}
        self.draining: dict[str, RuleRuntime] = {}
        self.stopping = False
        self.done: asyncio.Future[int] = loop.create_future()
        self.drain_secs = 30.0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.loop.add_reader(self.channel.fileno(), self.on_channel)
        self.loop.add_signal_handler(signal.SIGTERM, self.begin_stop)
        self.loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides
        self.send(Ready())
        self.heartbeat()

    def heartbeat(self) -> None:
        if not self.done.done():
            self.send(Heartbeat())
            flush_throttled()  # a per-connection flood that stopped still gets its summary
            self.loop.call_later(HEARTBEAT_SECS, self.heartbeat)

    def send(self, msg: Message) -> None:
        self.channel.send(msg)
        if self.channel.wants_write:
            self.loop.add_writer(self.channel.fileno(), self._flush)

    def _flush(self) -> None:
        if self.channel.flush():
            self.loop.remove_writer(self.channel.fileno())

    def on_channel(self) -> None:
        try:
            frames = self.channel.read()
        except (EOFError, ProtocolError, OSError) as exc:
            # The supervisor is gone: nobody holds our listeners any more; stop.
            log_event("shard.supervisor_lost", level="error", shard=self.index, error=str(exc))
            self.loop.remove_reader(self.channel.fileno())
            self.begin_stop(exit_code=SHARD_LOST_SUPERVISOR)
            return
        for msg, fds in frames:
            try:
                self.dispatch(msg, fds)
            except Exception as exc:  # noqa: BLE001 - report, keep serving
                log_event(
                    "shard.message_failed",
                    level="error",
                    shard=self.index,
                    type=tag(type(msg)),
                    error=repr(exc),
                )

    def dispatch(self, msg: Message, fds: list[int]) -> None:
        if isinstance(msg, Config):
            new = msg.settings
            changed = (
                sorted(k for k, v in new.items() if self.ctx.settings.get(k) != v)
                if self.ctx.settings
                else []
            )
            self.ctx.settings.update(new)
            self.ctx.connect_timeout = float(self.ctx.settings.get("connect_timeout_secs", 5.0))
            self.ctx.client_hello_timeout = float(
                self.ctx.settings.get("sni_client_hello_timeout_secs", CLIENT_HELLO_TIMEOUT_SECS)
            )
            self.ctx.use_splice = bool(self.ctx.settings.get("use_splice", True))
            self.drain_secs = float(self.ctx.settings.get("shutdown_drain_timeout_secs", 30.0))
            configure_logs(
                fmt=self.ctx.settings.get("log_format"), level=self.ctx.settings.get("log_level")
            )
            for handler in self.handlers.values():
                retune = getattr(handler, "retune", None)
                if retune is not None:
                    retune()  # a reload: UDP handlers take the new flow limits now
            if changed:  # a reload (the first config frame sets everything)
                log_event("shard.reconfigured", shard=self.index, keys=changed)
        elif isinstance(msg, Listeners):
            for key, fd in zip(msg.add, fds, strict=True):
                old = self.listeners.pop(key, None)
                if old is not None:
                    self._unserve(key, old)
                s = socket.socket(fileno=fd)
                s.setblocking(False)
                self.listeners[key] = s
            for key in msg.remove:
                gone = self.listeners.pop(key, None)
                if gone is not None:
                    self._unserve(key, gone)
            self.rebuild()
        elif isinstance(msg, Rules):
            for wire in msg.upsert:
                self.upsert(Rule.from_wire(wire))
            for rid in msg.remove:
                self.remove(rid)
            self.rebuild()
        elif isinstance(msg, OwnerCaps):
            self.owner_caps(msg.caps)
        else:
            close_fds(fds)
            log_event("shard.unexpected_message", level="warning", type=tag(type(msg)))

    # ---------------------------------------------------------------- rules

    def upsert(self, rule: Rule) -> None:
        old = self.rules.get(rule.id)
        if old is not None and old.rule == rule:
            return
        rt = RuleRuntime(self.ctx, rule)
        if old is not None:
            # Open connections carry on under the new runtime (same metric labels).
            old.stop()
            for conn in old.conns:
                conn.rt = rt
            rt.conns |= old.conns
            old.conns.clear()
        self.rules[rule.id] = rt

    def owner_caps(self, caps: dict[str, dict[str, int]]) -> None:
        """The node's owner caps (the full set) changed: re-point the runtimes of the
        owners concerned; open paced connections see the new buckets at once."""
        from portunus.shard.owner_limits import count_open

        changed = self.ctx.owners.replace(caps)
        for rt in self.rules.values():
            if rt.rule.owner in changed:
                rt.refresh_limits()
                repace_rule(rt)  # open spliced relays of a newly capped owner: paced now
                budget = changed[rt.rule.owner]
                if budget is not None:
                    count_open(rt.conns, budget)  # open connections count against a new cap

    def remove(self, rid: str) -> None:
        rt = self.rules.pop(rid, None)
        if rt is None:
            self.send(Drained(ids=[rid]))
            return
        rt.draining = True
        rt.stop()
        if not rt.conns:
            self._rule_drained(rt)
            return
        self.draining[rid] = rt
        self.loop.call_later(self.drain_secs, self._force_drain, rt)

    def _force_drain(self, rt: RuleRuntime) -> None:
        if rt.conns:
            log_event("rule.drain_timeout", level="warning", rule=rt.rule.id, open=len(rt.conns))
            rt.close_all()

    def _rule_drained(self, rt: RuleRuntime) -> None:
        self.draining.pop(rt.rule.id, None)
        if rt.rule.id not in self.rules:
            m.forget_rule(rt.rule.client, rt.rule.id)
            self.send(Drained(ids=[rt.rule.id]))
        self._maybe_finish_stop()

    # ------------------------------------------------------------- handlers

    def handler_for(self, key: str) -> tuple[Any, Any]:
        """(signature, factory) of what should serve listener ``key`` now."""
        proto, _, port_s = key.partition("/")
        port = int(port_s)
        rts = [
            rt
            for rt in self.rules.values()
            if rt.rule.protocol == proto and rt.rule.listen_start <= port <= rt.rule.listen_end
        ]
        if not rts:
            return None, None
        if proto == "udp":
            rt = rts[0]
            kind = "nudp" if native_udp_eligible(self.ctx, rt) else "udp"
            return (kind, id(rt)), lambda s: self._udp_handler(rt, s, port - rt.rule.listen_start)
        # An SNI port stays one while its fallback is its only rule (sni_fallback).
        if len(rts) == 1 and rts[0].rule.sni is None and not rts[0].rule.sni_fallback:
            rt = rts[0]
            if native_eligible(self.ctx, rt):
                return ("ntcp", id(rt)), lambda s: NativeTcpHandler(
                    self.ctx, rt, port - rt.rule.listen_start, s
                )
            return ("tcp", id(rt)), lambda s: PlainTcpHandler(
                self.ctx, rt, port - rt.rule.listen_start
            )
        sig = ("sni", tuple(sorted(id(rt) for rt in rts)))
        return sig, lambda s: self._sni_handler(port, rts)

    def _udp_handler(self, rt: RuleRuntime, s: socket.socket, port_index: int) -> Any:
        if native_udp_eligible(self.ctx, rt):
            from portunus.shard.native_udp import NativeUdpHandler

            return NativeUdpHandler(self.ctx, rt, s, port_index)
        from portunus.shard.udp import UdpService

        return UdpService(self.ctx, rt, s, port_index)

    def _sni_handler(self, port: int, rts: list[RuleRuntime]) -> Any:
        from portunus.shard.sni_handler import SniHandler

        return SniHandler(self.ctx, port, rts)

    def rebuild(self) -> None:
        """Point every listener at the handler its current rules call for."""
        for key, s in self.listeners.items():
            sig, factory = self.handler_for(key) if not self.stopping else (None, None)
            if sig == self.handler_sig.get(key):
                continue
            self._unserve(key, s, close=False)
            if factory is None:
                continue
            handler = factory(s)
            self.handlers[key] = handler
            self.handler_sig[key] = sig
            if hasattr(handler, "start"):
                handler.start()
            else:
                self.loop.add_reader(s.fileno(), handler.on_accept, s)

    def _unserve(self, key: str, s: socket.socket, close: bool = True) -> None:
        handler = self.handlers.pop(key, None)
        self.handler_sig.pop(key, None)
        if handler is not None:
            if hasattr(handler, "close"):
                handler.close()
            if not hasattr(handler, "start"):
                # rebuild() registered this accept handler's reader (an SniHandler
                # has close() too): a reader left on a closed listener's fd would
                # fire for the next socket that gets the same fd number.
                try:
                    self.loop.remove_reader(s.fileno())
                except (ValueError, OSError):
                    pass
        if close:
            s.close()

    def _accept_backoff(self, lsock: socket.socket) -> None:
        fd = lsock.fileno()
        for key, s in self.listeners.items():
            if (
                s.fileno() == fd
                and key in self.handlers
                and not hasattr(self.handlers[key], "start")
            ):
                handler = self.handlers[key]
                self.loop.remove_reader(fd)
                self.loop.call_later(0.1, self._resume_accept, key, s, handler)

    def _resume_accept(self, key: str, s: socket.socket, handler: Any) -> None:
        if key in self.handlers and self.handlers[key] is handler and s.fileno() >= 0:
            self.loop.add_reader(s.fileno(), handler.on_accept, s)

    # ----------------------------------------------------------------- stop

    def begin_stop(self, exit_code: int = SHARD_OK) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.exit_code = exit_code
        log_event(
            "shard.stopping",
            shard=self.index,
            open=sum(len(rt.conns) for rt in self.rules.values()),
        )
        for key, s in list(self.listeners.items()):
            self._unserve(key, s)
        self.listeners.clear()
        for rt in self.rules.values():
            rt.draining = True
            rt.stop()
        self.loop.call_later(self.drain_secs, self._stop_now)
        self._maybe_finish_stop()

    def _maybe_finish_stop(self) -> None:
        if not self.stopping or self.done.done():
            return
        if any(rt.conns for rt in self.rules.values()) or any(
            rt.conns for rt in self.draining.values()
        ):
            return
        self.done.set_result(self.exit_code)

    def _stop_now(self) -> None:
        if self.done.done():
            return
        for rt in [*self.rules.values(), *self.draining.values()]:
            rt.close_all()
        if not self.done.done():
            self.done.set_result(self.exit_code)


def run_shard(index: int, sock: socket.socket) -> None:
    """Entry point in the forked child; never returns."""
    import uvloop

    code = SHARD_BOOT_ERROR
    try:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        shard = Shard(index, loop, sock)
        shard.start()
        code = loop.run_until_complete(shard.done)
        shard.channel.flush()
    except Exception as exc:  # noqa: BLE001
        log_event("shard.crashed", level="error", shard=index, error=repr(exc))
        code = 1
    finally:
        sys.stderr.flush()
    os._exit(code)
