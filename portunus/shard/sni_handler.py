"""SNI-routed TCP ports: peek the ClientHello, pick a rule, replay the bytes.

Several rules share one TCP port.  For each accepted connection the shard reads
(at most MAX_CLIENT_HELLO bytes, within ``sni_client_hello_timeout_secs``,
default ``sni.CLIENT_HELLO_TIMEOUT_SECS``) until the ClientHello is
complete, chooses exact > wildcard > fallback, then hands the connection to the
ordinary TCP path with the peeked bytes as the prelude that is written to the
target first — after which the zero-copy relay takes over.  TLS is never
terminated.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from portunus.logs import log_event, log_throttled
from portunus.shard import metrics as m
from portunus.shard.sni import MAX_CLIENT_HELLO, ClientHelloError, SniTable, extract_sni
from portunus.shard.tcp import TcpConnection, accept_batch

if TYPE_CHECKING:
    from portunus.shard.runtime import RuleRuntime, ShardContext


class SniHandler:
    """Serves one SNI-mode TCP port for all the rules that share it."""

    def __init__(self, ctx: ShardContext, port: int, rts: list[RuleRuntime]) -> None:
        self.ctx = ctx
        self.port = port
        self.by_id = {rt.rule.id: rt for rt in rts}
        self.table = SniTable((rt.rule.sni, rt.rule.id) for rt in rts)
        client = rts[0].rule.client
        self.misses = m.SNI_MISSES.labels(client, str(port))
        self.parse_failures = m.SNI_PARSE_FAILURES.labels(client, str(port))
        self.peeks: set[SniPeek] = set()

    def on_accept(self, lsock: socket.socket) -> None:
        for conn in accept_batch(self.ctx, lsock):
            SniPeek(self, conn).start()

    def close(self) -> None:
        for p in list(self.peeks):
            p.abort()

    def route(self, peek: SniPeek, name: str | None) -> None:
        hit = self.table.match(name)
        if hit is None:
            self.misses.inc()
            log_throttled(
                "tls.sni_no_match" if name else "tls.no_sni", level="info", port=self.port, sni=name
            )
            peek.downstream.close()
            return
        rule_id, kind = hit
        rt = self.by_id[rule_id]
        if not rt.admit():
            peek.downstream.close()
            return
        m.SNI_ROUTES.labels(*rt.meters.labels, kind).inc()
        log_event(
            "tls.sni_routed", level="debug", port=self.port, sni=name, rule=rule_id, result=kind
        )
        data = bytes(peek.buf)
        conn = TcpConnection(self.ctx, rt, peek.downstream, 0, prelude=data)
        conn.account.add_in(len(data))  # the peeked bytes came from the downstream peer
        conn.start()


class SniPeek:
    """Reads the first bytes of one connection until its ClientHello is complete."""

    __slots__ = ("handler", "downstream", "buf", "timer", "fd")

    def __init__(self, handler: SniHandler, downstream: socket.socket) -> None:
        self.handler = handler
        self.downstream = downstream
        self.buf = bytearray()
        self.timer: Any = None
        self.fd = downstream.fileno()

    def start(self) -> None:
        loop = self.handler.ctx.loop
        self.handler.peeks.add(self)
        loop.add_reader(self.fd, self.on_readable)
        self.timer = loop.call_later(self.handler.ctx.client_hello_timeout, self.on_timeout)

    def _finish(self) -> None:
        self.handler.peeks.discard(self)
        self.handler.ctx.loop.remove_reader(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def on_readable(self) -> None:
        try:
            chunk = self.downstream.recv(MAX_CLIENT_HELLO - len(self.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish()
            self.downstream.close()
            return
        if not chunk:
            self._fail("eof")
            return
        self.buf += chunk
        try:
            complete, name = extract_sni(self.buf)
        except ClientHelloError as exc:
            self._fail(exc.reason)
            return
        if complete:
            self._finish()
            self.handler.route(self, name)

    def on_timeout(self) -> None:
        self.timer = None
        self._fail("timeout")

    def _fail(self, reason: str) -> None:
        self._finish()
        self.handler.parse_failures.inc()
        event = "tls.client_hello_timeout" if reason == "timeout" else "tls.parse_failed"
        log_throttled(event, level="info", port=self.handler.port, reason=reason)
        self.downstream.close()

    def abort(self) -> None:
        self._finish()
        self.downstream.close()
