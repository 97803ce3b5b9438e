"""The link child of ``portunus-client``: the client's rule source is the server.

Runs in its own process, forked by the client's supervisor with a channel
(the client tree's rule source, portunus/process_trees.py).  It keeps one TLS
connection to the server's ``control_listen`` (certificate pinned by
fingerprint), and relays:

- server ``sync``/``apply`` -> persisted to ``rules.json`` -> supervisor;
- supervisor ``applied``/``removed`` -> server (``applied`` only to the session
  that asked: a reconnect brings a fresh full ``sync`` anyway);
- every ``stats_secs`` a ``stats`` frame read from the multiprocess metrics dir,
  sent only when the counters changed since the last one this session sent.

The hello advertises ``quiet_link``: a server that knows it answers with a
slower cadence in the welcome (``heartbeat_secs`` for our pings, ``ping_secs``
for its own), so ten thousand idle clients do not keep the server busy; an older
server's welcome has ``heartbeat_secs`` only and the original cadence holds.

At start, before connecting, it hands the supervisor the persisted rule set, so
forwarding goes on while the server is down.  A lost link is retried forever
with jittered exponential backoff; only ``error: revoked`` ends it: the link
deletes the cached rules, writes the revoked marker and exits with
``EXIT_HALT`` so the supervisor stops the whole client instead of respawning.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from portunus import __version__
from portunus.config import Settings
from portunus.edge import revoked
from portunus.edge.bundle import Bundle, write_bundle
from portunus.edge.pinning import FingerprintMismatch, close_quietly, link_error, open_pinned
from portunus.edge.rulestore import RuleStore, check_owner_caps
from portunus.edge.timing import Backoff, LinkTiming, busy_delay
from portunus.errors import PortunusError
from portunus.exitcodes import ChildExit
from portunus.ipc import edge_messages as em
from portunus.ipc import messages as sup
from portunus.ipc.channel_end import SupervisorEnd
from portunus.ipc.edge_wire import MAX_FRAME, WireError, encode_frame, read_message, write_frame
from portunus.logs import log_event, log_throttled
from portunus.metrics.per_rule import rule_totals
from portunus.rules import Rule
from portunus.schema.check import validate
from portunus.schema.wire import WireRule

# The supervisor halts (no respawn) when the link exits REVOKED and the client exits
# ServiceExit.REVOKED (4); the client CLI then finds the revoked marker and explains.
EXIT_HALT = int(ChildExit.REVOKED)


class Revoked(Exception):
    """The server said ``error: revoked``: never reconnect with this token."""


class Refused(Exception):
    """The server refused the session (``unauthenticated`` or another error frame)."""

    def __init__(self, code: str, message: str, retry_after: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


QUIET_LINK = "quiet_link"
# On a quiet link the server pings rarely; the kernel cuts the connection when our
# own pings stay unacknowledged this long (server host or network gone).
QUIET_USER_TIMEOUT_MS = 30_000


def user_timeout(writer: asyncio.StreamWriter, ms: int) -> None:
    """TCP_USER_TIMEOUT on the link's socket where the platform has it (Linux)."""
    sock = writer.get_extra_info("socket")
    opt = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is None or opt is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, opt, ms)
    except OSError as exc:
        log_event("link.user_timeout_unset", level="warning", error=str(exc))


class LinkDead(Exception):
    """No frame from the server within ``dead_secs``."""


_DETAIL_ROWS = ("per_port", "per_target")


def stats_frame(
    totals: dict[str, dict[str, Any]], max_len: int = MAX_FRAME, run: str = ""
) -> em.Stats:
    """The ``stats`` frame; without the per-port/per-target rows when they would
    make it longer than a frame may be (a client with ranges over most ports and
    busy counters), so the totals still reach the server and the link stays up."""
    msg = em.Stats(rules=totals, run=run)
    if len(em.encode(msg)) <= max_len:
        return msg
    log_throttled(
        "link.stats_detail_dropped",
        level="warning",
        rules=len(totals),
        limit=max_len,
        hint="the per-port and per-target rows do not fit one frame; totals are sent",
    )
    return em.Stats(
        run=run,
        rules={
            rid: {k: v for k, v in entry.items() if k not in _DETAIL_ROWS}
            for rid, entry in totals.items()
        },
    )


@dataclass
class _Session:
    """One welcomed connection; ``number`` tells late supervisor answers apart."""

    number: int
    writer: asyncio.StreamWriter
    last_tx: float = 0.0  # loop time of the latest frame sent (pings only fill silence)

    def send(self, msg: em.Frame) -> None:
        # Called from supervisor callbacks (not coroutines): the transport buffers;
        # a stuck server is caught by the dead-link timer, not here.
        if not self.writer.transport.is_closing():
            self.writer.write(encode_frame(msg))
            self.last_tx = asyncio.get_running_loop().time()


@dataclass
class _Pending:
    """A frame handed to the supervisor, waiting for its ``applied``."""

    session: int | None  # None: our own start-up sync, never relayed
    server_seq: int | None
    rejected: dict[str, dict[str, Any]] = field(default_factory=dict)


class EdgeLink:
    def __init__(
        self,
        bundle: Bundle,
        data_dir: str,
        channel_sock: socket.socket,
        capabilities: Sequence[str],
        metrics_dir: str,
        timing: LinkTiming | None = None,
    ) -> None:
        self.bundle = bundle
        self.data_dir = data_dir
        self.capabilities = list(capabilities)
        self.metrics_dir = metrics_dir
        self.timing = timing or LinkTiming()
        self.store = RuleStore(data_dir, bundle.client_id)
        self.sup = SupervisorEnd(channel_sock, self._from_supervisor, self._supervisor_lost)
        self.backoff = Backoff(self.timing.backoff_first, self.timing.backoff_max)
        self._seq = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._sessions = itertools.count(1)
        self._session: _Session | None = None
        self._removed_backlog: list[str] = []
        self._wake = asyncio.Event()
        self._done: asyncio.Future[int] | None = None

    # ============================================================ lifecycle

    async def run(self) -> int:
        """Apply the cached rules, then connect and reconnect until stopped; return the
        exit code (0 on SIGTERM, EXIT_HALT when revoked)."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self.sup.start()
        cached = self.store.load()
        if self.store.owner_caps:  # before the rules: they start inside their owners' envelopes
            self.sup.send(sup.OwnerCaps(caps=self.store.owner_caps))
        self.sup.send(sup.Sync(seq=self._expect(_Pending(None, None)), rules=cached))
        log_event("link.cached_rules_applied", rules=len(cached), path=self.store.path)
        self.sup.send(sup.Up())  # started: a death from here on is not a boot failure
        task = asyncio.create_task(self._connect_loop())
        try:
            return await self._done
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.sup.close()

    def stop(self, code: int, why: str) -> None:
        if self._done is not None and not self._done.done():
            # child_exit, not exit_code: the process exits with the supervisor's code
            # (ServiceExit), which the supervisor.halt / supervisor.stopped lines carry.
            log_event("link.stopping", reason=why, child_exit=code)
            self._done.set_result(code)

    def reconnect_now(self) -> None:
        """SIGHUP: skip the rest of the backoff wait."""
        self.backoff.reset()
        self._wake.set()

    async def _connect_loop(self) -> None:
        # Every wait in here uses asyncio.timeout, not wait_for: on Python 3.11 wait_for
        # can swallow the cancel from run()'s shutdown, and the loop would go on forever.
        while self._done is None or not self._done.done():
            delay: float | None = None
            try:
                await self._session_once()
            except Revoked as exc:
                self._revoked(str(exc))
                return
            except FingerprintMismatch as exc:
                log_event(
                    "link.fingerprint_mismatch",
                    level="error",
                    expected=exc.expected,
                    got=exc.got,
                    server=exc.where,
                    error=str(exc),
                )
            except Refused as exc:
                if exc.code == "busy":  # load shedding: come back when the server said, spread
                    delay = busy_delay(exc.retry_after, self.backoff)
                    log_event(
                        "link.server_busy",
                        level="warning",
                        server=self.bundle.server,
                        retry_after=exc.retry_after,
                        in_secs=round(delay, 2),
                    )
                else:
                    log_event(
                        "link.refused",
                        level="error",
                        code=exc.code,
                        message=exc.message,
                        server=self.bundle.server,
                        hint="the server does not accept this bundle's token; enroll again if it was deleted",
                    )
            except LinkDead:
                log_event(
                    "link.dead",
                    level="warning",
                    server=self.bundle.server,
                    silent_secs=self.timing.dead_secs,
                )
            except (TimeoutError, OSError, asyncio.IncompleteReadError, WireError) as exc:
                log_event(
                    "link.disconnected",
                    level="warning",
                    server=self.bundle.server,
                    error=link_error(exc),
                )
            except Exception as exc:  # noqa: BLE001 - a bug must not stop forwarding; retry
                log_event("link.crashed_session", level="error", error=repr(exc))
            if delay is None:
                delay = self.backoff.next()
            log_event("link.reconnecting", in_secs=round(delay, 2))
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    # ============================================================ session

    async def _session_once(self) -> None:
        """Connect, say hello, serve until the link ends (always by an exception)."""
        host, port = self.bundle.host_port()
        reader, writer = await open_pinned(
            host, port, self.bundle.fingerprint, self.timing.connect_timeout
        )
        try:
            hello = em.Hello(
                token=self.bundle.token,
                client_id=self.bundle.client_id,
                version=__version__,
                capabilities=[*self.capabilities, QUIET_LINK],
            )
            await write_frame(writer, hello)
            async with asyncio.timeout(self.timing.handshake_timeout):
                welcome = await read_message(reader)
            if isinstance(welcome, em.Error):
                self._raise_refusal(welcome)
            if not isinstance(welcome, em.Welcome):
                raise WireError(f"expected welcome, got {em.kind(welcome)!r}")
            await self._serve(reader, writer, welcome)
        finally:
            self._session = None
            await close_quietly(writer, reader=reader)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, welcome: em.Welcome
    ) -> None:
        session = _Session(next(self._sessions), writer)
        self._session = session
        self.backoff.reset()
        heartbeat, dead_secs = link_cadence(welcome, self.timing)
        if welcome.ping_secs is not None:
            user_timeout(writer, QUIET_USER_TIMEOUT_MS)
        name = welcome.client_name
        peer = writer.get_extra_info("peername")
        log_event(
            "link.connected",
            server=self.bundle.server,
            client_id=self.bundle.client_id,
            client_name=name or self.bundle.client_name,
            local=str(writer.get_extra_info("sockname")),
            peer=str(peer),
            heartbeat_secs=heartbeat,
            dead_secs=dead_secs,
        )
        if name and name != self.bundle.client_name:
            self._rename(name)
        if self._removed_backlog:
            session.send(em.Removed(ids=list(self._removed_backlog)))
            self._removed_backlog = []
        tasks = [
            asyncio.create_task(self._pinger(session, heartbeat)),
            asyncio.create_task(self._stats_loop(session)),
        ]
        try:
            while True:
                try:
                    async with asyncio.timeout(dead_secs):
                        msg = await read_message(reader)
                except TimeoutError:
                    # No close_notify dance with a peer that stopped answering: it would
                    # only delay the reconnect (and the log line) by the close timeout.
                    writer.transport.abort()
                    raise LinkDead() from None
                self._from_server(session, msg)
                # Surface a crashed helper task instead of carrying on half-alive.
                for t in tasks:
                    if t.done() and not t.cancelled() and (crash := t.exception()) is not None:
                        raise crash
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _raise_refusal(self, msg: em.Error) -> None:
        code = msg.code or "error"
        if code == "revoked":
            raise Revoked(msg.message or "the server revoked this client")
        raise Refused(code, msg.message, msg.retry_after)

    async def _pinger(self, session: _Session, every: float) -> None:
        """A ping when nothing else went out for ``every`` seconds."""
        loop = asyncio.get_running_loop()
        session.last_tx = loop.time()
        while True:
            await asyncio.sleep(max(0.0, session.last_tx + every - loop.time()))
            if loop.time() - session.last_tx >= every * 0.99:
                session.send(em.Ping())

    async def _stats_loop(self, session: _Session) -> None:
        """Counters that did not move are not sent again: the server keeps the latest."""
        last: dict[str, dict[str, Any]] | None = None
        while True:
            await asyncio.sleep(self.timing.stats_secs)
            ids = list(self.store.rules)
            try:
                totals = await asyncio.to_thread(rule_totals, self.metrics_dir, ids)
            except (OSError, ValueError) as exc:  # a file vanishing mid-read: next round
                log_event("link.stats_unreadable", level="warning", error=str(exc))
                continue
            if totals == last:
                continue
            # "run": counters restart with each run of this client's supervisor; the
            # server banks the previous run's totals when it changes.
            session.send(stats_frame(totals, run=os.environ.get("PORTUNUS_RUN_ID", "")))
            last = totals

    # ============================================================ server -> us

    def _from_server(self, session: _Session, msg: em.Frame) -> None:
        if isinstance(msg, em.Sync):
            good, rejected = _check_rules(msg.rules)
            self.store.replace(good)
            pending = _Pending(session.number, msg.seq, rejected)
            self.sup.send(sup.Sync(seq=self._expect(pending), rules=good))
            log_event("link.sync", rules=len(good), rejected=len(rejected), seq=msg.seq)
        elif isinstance(msg, em.Apply):
            good, rejected = _check_rules(msg.upsert)
            remove = [str(r) for r in msg.remove if isinstance(r, (str, int))]
            self.store.apply(good, remove)
            pending = _Pending(session.number, msg.seq, rejected)
            self.sup.send(sup.Apply(seq=self._expect(pending), upsert=good, remove=remove))
        elif isinstance(msg, em.OwnerCaps):
            caps = check_owner_caps(msg.caps)
            self.store.set_owner_caps(caps)
            self.sup.send(sup.OwnerCaps(caps=caps))
            log_event("link.owner_caps", owners=len(caps))
        elif isinstance(msg, em.Renamed):
            if msg.client_name:
                self._rename(msg.client_name)
        elif isinstance(msg, em.Error):
            self._raise_refusal(msg)
        # ping, welcome and unknown types: nothing to do (any frame proves the link alive)

    def _rename(self, name: str) -> None:
        old, self.bundle.client_name = self.bundle.client_name, name
        log_event("link.renamed", client_id=self.bundle.client_id, old=old, new=name)
        if self.bundle.path:
            try:
                write_bundle(self.bundle.path, self.bundle)
            except OSError as exc:
                log_event(
                    "link.bundle_write_failed",
                    level="warning",
                    path=self.bundle.path,
                    error=str(exc),
                    hint="the name is informational on the client; rules and the link are unaffected",
                )

    def _revoked(self, message: str) -> None:
        log_event(
            "link.revoked",
            level="error",
            client_id=self.bundle.client_id,
            client_name=self.bundle.client_name,
            server=self.bundle.server,
            message=message,
            hint="the client stops; enroll it again with a new code to bring it back",
        )
        self.store.clear()
        try:
            revoked.write_marker(self.data_dir, self.bundle, message)
        except OSError as exc:
            log_event("link.marker_write_failed", level="error", error=str(exc))
        self.stop(EXIT_HALT, "revoked by the server")

    # ============================================================ supervisor

    def _expect(self, pending: _Pending) -> int:
        """The seq of a frame for the supervisor, whose ``applied`` ``pending`` awaits."""
        seq = next(self._seq)
        self._pending[seq] = pending
        return seq

    def _from_supervisor(self, msg: sup.Message) -> None:
        if isinstance(msg, sup.Applied):
            pending = self._pending.pop(msg.seq, None)
            if pending is None:
                log_event("link.unexpected_seq", level="warning", seq=msg.seq)
                return
            results = _plain(msg.results)
            results.update(pending.rejected)
            failed = {rid: r["reason"] for rid, r in results.items() if r["state"] == "failed"}
            if failed:
                log_event("link.rules_failed", level="warning", failed=failed)
            live = self._session
            if pending.session is not None and live is not None and live.number == pending.session:
                live.send(em.Applied(seq=pending.server_seq, results=results))
        elif isinstance(msg, sup.Retried):
            # A failed rule bound later (its port freed): tell the server, unasked.
            if self._session is not None:
                self._session.send(em.Applied(seq=None, results=_plain(msg.results)))
        elif isinstance(msg, sup.Removed):
            ids = msg.ids
            if self._session is not None:
                self._session.send(em.Removed(ids=list(ids)))
            else:  # tell the server once it is back: it may be waiting to delete drained rows
                self._removed_backlog.extend(i for i in ids if i not in self._removed_backlog)
        elif isinstance(msg, sup.Hello):
            log_event("link.supervisor_hello", shards=msg.shards)

    def _supervisor_lost(self, why: str) -> None:
        self.stop(1, f"supervisor channel: {why}")


def _plain(outcomes: sup.Outcomes) -> dict[str, dict[str, Any]]:
    """Outcomes as the ``results`` of an edge ``applied`` frame."""
    return {rid: {"state": o.state, "reason": o.reason} for rid, o in outcomes.items()}


def link_cadence(welcome: em.Welcome, timing: LinkTiming) -> tuple[float, float]:
    """``(our ping interval, dead after)`` from the server's welcome: a quiet-link
    welcome (it has ``ping_secs``) names the dead interval for both sides
    (``dead_after_secs``; else two of its pings plus one of ours); an older
    server's has ``heartbeat_secs`` only and ``timing.dead_secs`` holds."""

    def secs(v: Any) -> float | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
            return None
        return float(v)

    heartbeat = secs(welcome.heartbeat_secs) or timing.heartbeat_secs
    ping = secs(welcome.ping_secs)
    if ping is None:
        return heartbeat, timing.dead_secs
    return heartbeat, max(timing.dead_secs, secs(welcome.dead_after_secs) or 2 * ping + heartbeat)


def _check_rules(raw: Any) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Split wire rules into ones the supervisor can load and failed results for the
    rest: a malformed rule from the server must fail alone, not crash the supervisor."""
    good: list[dict[str, Any]] = []
    rejected: dict[str, dict[str, Any]] = {}
    for i, w in enumerate(raw if isinstance(raw, list) else []):
        rid = str(w.get("id")) if isinstance(w, dict) and w.get("id") is not None else f"#{i}"
        try:
            if not isinstance(w, dict):
                raise TypeError("not an object")
            validate(w, WireRule)  # types and bounds of every field, unknown keys allowed
            good.append(Rule.from_wire(w).to_wire())
        except PortunusError as exc:
            rejected[rid] = {"state": "failed", "reason": f"malformed rule: {exc.message}"}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            rejected[rid] = {"state": "failed", "reason": f"malformed rule: {exc!r}"}
    return good, rejected


async def serve_link(
    settings: Settings,
    bundle: Bundle,
    channel_sock: socket.socket,
    capabilities: Sequence[str],
    timing: LinkTiming | None = None,
) -> int:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.metrics_dir
    link = EdgeLink(bundle, settings.data_dir, channel_sock, capabilities, metrics_dir, timing)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, link.stop, 0, signal.Signals(sig).name)
    # The supervisor passes SIGHUP on to its rule source: here it means "reconnect now".
    loop.add_signal_handler(signal.SIGHUP, link.reconnect_now)
    return await link.run()


def run_link(
    settings: Settings,
    bundle: Bundle,
    channel_sock: socket.socket,
    capabilities: Sequence[str],
    timing: LinkTiming | None = None,
) -> None:
    """Entry point of the link child (never returns; exits with the link's code)."""
    import uvloop

    raise SystemExit(uvloop.run(serve_link(settings, bundle, channel_sock, capabilities, timing)))
