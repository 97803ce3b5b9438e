"""Resolve DNS-name targets inside a shard without ever blocking its event loop.

A shard resolves a target's host when it opens a connection to it.  Answers are
cached per name with the record TTL clamped to ``[min_ttl, max_ttl]``; concurrent
callers for one name share one lookup; when the resolver fails after an answer
expired, the old answer is served for ``stale_secs``.  Lookups go through a small
UDP stub client (TCP when the answer is truncated) against the nameservers of
resolv.conf, after /etc/hosts.  Only when no nameserver is configured does it fall
back to ``loop.getaddrinfo``, which runs in a thread pool; calling
``socket.getaddrinfo`` here would stall every connection of the shard for as long
as the system resolver takes.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from portunus.logs import log_event
from portunus.shard.dns_wire import (
    RCODE_NXDOMAIN,
    TYPE_A,
    TYPE_AAAA,
    FormatError,
    decode_answer,
    encode_query,
    parse_hosts,
    parse_resolv_conf,
)

_GETADDRINFO_TTL = 30.0


class ResolveError(Exception):
    """The name has no usable address: the connection to this target fails now."""


class _Definitive(ResolveError):
    """The resolver answered: NXDOMAIN or no address records.  No stale answer."""


class _Entry:
    """One cached answer (``error`` is None) or a negative answer (``error`` set)."""

    __slots__ = ("v4", "v6", "expires", "refresh_at", "retry_at", "error")

    def __init__(
        self,
        v4: tuple[str, ...],
        v6: tuple[str, ...],
        expires: float,
        refresh_at: float,
        error: str | None = None,
    ) -> None:
        self.v4 = v4
        self.v6 = v6
        self.expires = expires
        # From refresh_at on, a hit starts a background lookup, so that steady
        # traffic never waits for DNS when the answer expires.
        self.refresh_at = refresh_at
        # After a failed lookup the answer is served (stale, if expired) without a
        # new attempt until retry_at, so an outage does not cost every new
        # connection a timeout.
        self.retry_at = expires
        self.error = error

    def ordered(self, prefer_ipv6: bool) -> list[str]:
        return list(self.v6 + self.v4) if prefer_ipv6 else list(self.v4 + self.v6)


class _WatchedFile:
    """A small config file parsed again whenever its mtime, size or inode changes.

    The ``os.stat`` runs only on cache misses (at most once per name per
    ``min_ttl``); it is a local syscall, not network I/O.
    """

    __slots__ = ("path", "parse", "key", "value")

    def __init__(self, path: str, parse: Callable[[str], Any]) -> None:
        self.path = path
        self.parse = parse
        self.key: tuple[int, int, int] | None = None
        self.value: Any = parse("")

    def get(self) -> Any:
        try:
            st = os.stat(self.path)
            key: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            key = None
        if key != self.key:
            text = ""
            if key is not None:
                try:
                    with open(self.path, encoding="utf-8", errors="replace") as f:
                        text = f.read()
                except OSError:
                    key = None
            self.key = key
            self.value = self.parse(text)
        return self.value


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


class _ReplyProtocol(asyncio.DatagramProtocol):
    """Waits for the one datagram carrying our query id; ignores anything else."""

    def __init__(self, qid: int, reply: asyncio.Future[bytes]) -> None:
        self.qid = qid
        self.reply = reply

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) >= 12 and int.from_bytes(data[:2], "big") == self.qid:
            if not self.reply.done():
                self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on a connected socket: move on to the next server.
        if not self.reply.done():
            self.reply.set_exception(exc)


class Resolver:
    """Per-shard cache and stub resolver.  Create it inside the shard's loop."""

    stale_retry_secs = 5.0

    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        hosts_path: str = "/etc/hosts",
        resolv_conf: str = "/etc/resolv.conf",
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 2.0,
        min_ttl: float = 5.0,
        max_ttl: float = 300.0,
        stale_secs: float = 30.0,
    ) -> None:
        self._fixed_servers = list(nameservers) if nameservers is not None else None
        self._hosts = _WatchedFile(hosts_path, parse_hosts)
        self._resolv = _WatchedFile(resolv_conf, parse_resolv_conf)
        self._clock = clock
        self.timeout = timeout
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.stale_secs = stale_secs
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[_Entry]] = {}
        # Plain counters; the shard exports them to Prometheus.
        self.lookups = 0  # lookups started (coalesced callers count once)
        self.queries = 0  # DNS queries sent (UDP and TCP)
        self.tcp_queries = 0  # of which retried over TCP after a truncated reply
        self.hosts_hits = 0  # lookups answered by the hosts file
        self.getaddrinfo_calls = 0
        self.cache_hits = 0
        self.stale_served = 0  # resolve() calls answered with an expired answer
        self.failures = 0  # lookups that ended without a fresh answer (logged)
        self.rejected = 0  # resolve() calls that raised ResolveError

    def nameservers(self) -> list[tuple[str, int]]:
        if self._fixed_servers is not None:
            return self._fixed_servers
        servers: list[tuple[str, int]] = self._resolv.get()
        return servers

    async def resolve(self, host: str, prefer_ipv6: bool = False) -> list[str]:
        """Addresses of ``host``, IPv4 first unless ``prefer_ipv6``; never empty.

        Raises ResolveError within about ``timeout`` × nameservers.
        """
        literal = _literal(host)
        if literal is not None:
            return [literal]
        name = host.lower().rstrip(".")
        now = self._clock()
        entry = self._cache.get(name)
        if entry is not None:
            if now < entry.expires:
                self.cache_hits += 1
                if entry.error is not None:
                    self.rejected += 1
                    raise ResolveError(entry.error)
                if now >= entry.refresh_at and name not in self._inflight:
                    self._start_lookup(name)  # refresh ahead; this caller does not wait
                return entry.ordered(prefer_ipv6)
            if entry.error is None and now < entry.retry_at:
                self.stale_served += 1
                return entry.ordered(prefer_ipv6)
        fut = self._inflight.get(name) or self._start_lookup(name)
        try:
            # shield: a caller that gives up must not cancel the others' lookup.
            entry = await asyncio.shield(fut)
        except ResolveError:
            self.rejected += 1
            raise
        if self._clock() >= entry.expires:
            self.stale_served += 1
        return entry.ordered(prefer_ipv6)

    def _start_lookup(self, name: str) -> asyncio.Future[_Entry]:
        fut = asyncio.ensure_future(self._refresh(name))
        self._inflight[name] = fut  # also keeps a background refresh referenced
        fut.add_done_callback(functools.partial(self._lookup_done, name))
        return fut

    def _lookup_done(self, name: str, fut: asyncio.Future[_Entry]) -> None:
        if self._inflight.get(name) is fut:
            del self._inflight[name]
        if not fut.cancelled():
            fut.exception()  # retrieved here so an unawaited failure is not logged

    def _store(self, name: str, v4: list[str], v6: list[str], ttl: float) -> _Entry:
        ttl = min(max(ttl, self.min_ttl), self.max_ttl)
        now = self._clock()
        entry = _Entry(
            tuple(dict.fromkeys(v4)), tuple(dict.fromkeys(v6)), now + ttl, now + ttl * 0.9
        )
        self._cache[name] = entry
        return entry

    async def _refresh(self, name: str) -> _Entry:
        """One lookup for ``name``, shared by every caller waiting on it."""
        self.lookups += 1
        hosts = self._hosts.get()
        if name in hosts:
            self.hosts_hits += 1
            v4, v6 = hosts[name]
            return self._store(name, list(v4), list(v6), self.min_ttl)
        try:
            v4, v6, ttl = await self._lookup(name)
        except ResolveError as exc:
            self.failures += 1
            now = self._clock()
            old = self._cache.get(name)
            if (
                not isinstance(exc, _Definitive)
                and old is not None
                and old.error is None
                and now < old.expires + self.stale_secs
            ):
                old.retry_at = min(now + self.stale_retry_secs, old.expires + self.stale_secs)
                old.refresh_at = old.retry_at
                # Logged here, once per failed lookup: the callers see an answer.
                log_event(
                    "dns.refresh_failed",
                    level="warning",
                    host=name,
                    error=str(exc),
                    serving_stale=now >= old.expires,
                )
                return old
            # The caller fails its connection and logs dns.resolve_failed.
            # A short negative entry: the next connections fail at once instead of
            # each waiting out the same timeouts.
            self._cache[name] = _Entry(
                (), (), now + self.min_ttl, now + self.min_ttl, error=str(exc)
            )
            raise
        return self._store(name, v4, v6, ttl)

    async def _lookup(self, name: str) -> tuple[list[str], list[str], float]:
        servers = self.nameservers()
        if not servers:
            return await self._getaddrinfo(name)
        try:
            encode_query(0, name, TYPE_A)
        except ValueError as exc:  # not a DNS name: empty or long label, non-ASCII
            raise _Definitive(str(exc)) from exc
        a, aaaa = await asyncio.gather(
            self._query(name, TYPE_A, servers),
            self._query(name, TYPE_AAAA, servers),
            return_exceptions=True,
        )
        for result in (a, aaaa):
            if isinstance(result, BaseException) and not isinstance(result, ResolveError):
                raise result
        answered = [r for r in (a, aaaa) if not isinstance(r, BaseException)]
        v4 = a[1] if not isinstance(a, BaseException) else []
        v6 = aaaa[1] if not isinstance(aaaa, BaseException) else []
        if v4 or v6:
            ttl = min(r[2] for r in answered if r[1])
            if len(answered) < 2:
                ttl = self.min_ttl  # one family failed: ask again soon
            return v4, v6, ttl
        if len(answered) < 2:
            failed = a if isinstance(a, BaseException) else aaaa
            raise ResolveError(f"{name}: {failed}")
        if any(r[0] == RCODE_NXDOMAIN for r in answered):
            raise _Definitive(f"{name}: NXDOMAIN")
        raise _Definitive(f"{name}: no A or AAAA records")

    async def _query(
        self, name: str, qtype: int, servers: list[tuple[str, int]]
    ) -> tuple[int, list[str], float]:
        """Ask each server in turn until one answers NOERROR or NXDOMAIN."""
        reason = "no nameserver"
        for server in servers:
            qid = secrets.randbits(16)
            packet = encode_query(qid, name, qtype)
            try:
                async with asyncio.timeout(self.timeout):
                    reply = await self._udp_exchange(server, qid, packet)
                    rcode, truncated, addrs, ttl = decode_answer(reply, qid, name, qtype)
                    if truncated:
                        reply = await self._tcp_exchange(server, packet)
                        rcode, truncated, addrs, ttl = decode_answer(reply, qid, name, qtype)
            except TimeoutError:
                reason = f"timeout from {server[0]}:{server[1]}"
                continue
            except (OSError, FormatError, asyncio.IncompleteReadError) as exc:
                reason = f"{server[0]}:{server[1]}: {exc!r}"
                continue
            if rcode == 0 or rcode == RCODE_NXDOMAIN:
                return rcode, addrs, ttl
            reason = f"rcode {rcode} from {server[0]}:{server[1]}"
        raise ResolveError(reason)

    async def _udp_exchange(self, server: tuple[str, int], qid: int, packet: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()
        # A fresh connected socket per query: random source port, and the kernel
        # drops datagrams from any other address.
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ReplyProtocol(qid, reply), remote_addr=server
        )
        try:
            self.queries += 1
            transport.sendto(packet)
            return await reply
        finally:
            transport.close()

    async def _tcp_exchange(self, server: tuple[str, int], packet: bytes) -> bytes:
        self.queries += 1
        self.tcp_queries += 1
        reader, writer = await asyncio.open_connection(server[0], server[1])
        try:
            writer.write(len(packet).to_bytes(2, "big") + packet)
            length = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(length)
        finally:
            writer.close()

    async def _getaddrinfo(self, name: str) -> tuple[list[str], list[str], float]:
        self.getaddrinfo_calls += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout * 2):
                infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            raise ResolveError(f"{name}: getaddrinfo: {exc!r}") from exc
        v4 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET]
        v6 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET6]
        if not v4 and not v6:
            raise ResolveError(f"{name}: getaddrinfo returned no address")
        return v4, v6, _GETADDRINFO_TTL
