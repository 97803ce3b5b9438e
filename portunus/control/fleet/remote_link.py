"""``DataPlane`` for remote edge clients: the live sessions, keyed by client id.

The gateway authenticates a link and ``attach``es its session here; from then on
the rule service reaches the client through ``apply``/``sync`` like it reaches
``local`` through ``LocalLink``.  The client's answers (``applied``/``removed``)
go to ``DataPlaneEvents`` unchanged, and its ``stats`` frames are kept in memory
(the latest per client) for ``rules.stats``.  One session per client: a new
``hello`` replaces the old session (a client that reconnects before the server
noticed the old link die must not be refused).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from portunus.control.dataplane import DataPlaneEvents, LinkInfo, RuleResult
from portunus.control.fleet.session import EdgeSession
from portunus.ipc import edge_messages as em
from portunus.rules import Rule
from portunus.text import is_ascii_digits

COUNTERS = ("bytes_in", "bytes_out", "connections_total", "active_connections")
TARGET_COUNTERS = ("connections_total", "connect_failures_total")


MAX_REASON = 500  # a client's failure reason is stored and shown: keep it bounded


def _int(value: Any) -> int:
    """A counter from a client: a non-negative int that fits a 64-bit counter, else 0."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
    return value if ok else 0


def _reason(value: Any) -> str | None:
    return value[:MAX_REASON] if isinstance(value, str) else None


def _parse_stats(raw: Any) -> dict[str, dict[str, Any]]:
    """``{rule id: {counters, per_port?, per_target?}}`` with every number checked."""
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(raw, dict):
        return out
    for rule_id, counters in raw.items():
        if not isinstance(counters, dict):
            continue
        entry: dict[str, Any] = {k: _int(counters.get(k)) for k in COUNTERS}
        ports = counters.get("per_port")
        if isinstance(ports, list):
            entry["per_port"] = {
                p["port"]: {k: _int(p.get(k)) for k in COUNTERS}
                for p in ports
                if isinstance(p, dict) and isinstance(p.get("port"), int)
            }
        targets = counters.get("per_target")
        if isinstance(targets, list):
            entry["per_target"] = {
                t["target"]: {
                    **{k: _int(t.get(k)) for k in TARGET_COUNTERS},
                    "up": t.get("up") if isinstance(t.get("up"), bool) else None,
                }
                for t in targets
                if isinstance(t, dict) and isinstance(t.get("target"), str)
            }
        out[str(rule_id)] = entry
    return out


class RemoteLink:
    """Every remote client's data plane (control process)."""

    def __init__(
        self,
        events: DataPlaneEvents | None = None,
        on_count: Callable[[int], None] | None = None,
    ) -> None:
        # Set before the gateway starts: the service that consumes the events needs this link first.
        self.events = events
        self.on_count = on_count or (lambda n: None)
        self.sessions: dict[str, EdgeSession] = {}
        self.stats: dict[str, dict[str, dict[str, Any]]] = {}
        # The client's run id from its stats frames: a new one means its counters
        # restarted from zero (portunus/control/counters.py banks the old ones).
        self.runs: dict[str, str | None] = {}
        # Clients revoked by this process: checked by the gateway right before
        # attach, so a hello racing a revoke cannot slip in (see gateway._hello).
        self.banned: set[str] = set()
        self._seq = itertools.count(1)
        self._sorted: list[str] | None = None  # session ids in order, rebuilt after a change
        self.on_count(0)

    def live_ids(self) -> list[str]:
        """Ids of the clients with a session, sorted (the order of ``clients.list``);
        cached between attaches/detaches so a page of ``connected: true`` costs a bisect."""
        if self._sorted is None:
            self._sorted = sorted(self.sessions)
        return self._sorted

    def live_name(self, client_id: str) -> str:
        session = self.sessions.get(client_id)
        return session.client_name if session is not None else ""

    # ------------------------------------------------------------- sessions

    def attach(self, session: EdgeSession) -> None:
        """Make ``session`` the client's link, closing any previous one."""
        old = self.sessions.get(session.client_id)
        self.sessions[session.client_id] = session
        if old is not None and old is not session:
            old.close(None, "replaced by a new session of the same client")
        self._sorted = None
        self.on_count(len(self.sessions))

    def detach(self, session: EdgeSession) -> None:
        """Forget ``session`` if it is still the client's link (not if replaced)."""
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            self._sorted = None
            self.on_count(len(self.sessions))

    def kick(self, client_id: str, goodbye: em.Error | None, reason: str) -> bool:
        """Close the client's session (revoke, delete); True if there was one."""
        session = self.sessions.get(client_id)
        if session is None:
            return False
        session.close(goodbye, reason)
        return True

    def renamed(self, client_id: str, name: str) -> None:
        """Tell a live client its new name; the session stays up."""
        session = self.sessions.get(client_id)
        if session is not None:
            session.client_name = name
            session.send(em.Renamed(client_name=name))

    def forget(self, client_id: str) -> None:
        """Drop what is kept about a deleted client."""
        self.stats.pop(client_id, None)

    def close_all(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            session.close(None, reason)

    # ------------------------------------------------------------- DataPlane

    def connected(self, client_id: str) -> bool:
        session = self.sessions.get(client_id)
        return session is not None and not session.closing

    def info(self, client_id: str) -> LinkInfo | None:
        session = self.sessions.get(client_id)
        if session is None or session.closing:
            return None
        return LinkInfo(
            connected_since=session.connected_since,
            remote_addr=session.remote_addr,
            version=session.version,
            capabilities=list(session.capabilities),
        )

    async def apply(self, client_id: str, upsert: Sequence[Rule], remove: Sequence[str]) -> None:
        session = self.sessions.get(client_id)
        if session is None:
            return  # the full set goes out when it reconnects
        session.send(
            em.Apply(
                seq=next(self._seq),
                upsert=[r.to_wire() for r in upsert],
                remove=[str(i) for i in remove],
            )
        )

    async def sync(self, client_id: str, rules: Sequence[Rule]) -> None:
        session = self.sessions.get(client_id)
        if session is None:
            return
        session.send(em.Sync(seq=next(self._seq), rules=[r.to_wire() for r in rules]))

    async def owner_caps(self, client_id: str, caps: dict[str, dict[str, int]]) -> None:
        session = self.sessions.get(client_id)
        # A client that does not enforce caps is not sent any (owner_caps.set refuses
        # them while it is connected; ones stored while it was away stay stored).
        if session is not None and "rate_limit" in session.capabilities:
            session.send(em.OwnerCaps(caps=caps))

    # ------------------------------------------------------------- answers

    def on_frame(self, session: EdgeSession, msg: em.Frame) -> None:
        """A frame from a client after its hello (called by the session's reader)."""
        client_id = session.client_id
        if isinstance(msg, em.Applied):
            results = {
                str(rule_id)[:20]: RuleResult(res["state"], _reason(res.get("reason")))
                for rule_id, res in msg.results.items()
                if isinstance(res, dict) and res.get("state") in ("active", "failed")
            }
            assert self.events is not None
            self.events.rules_applied(client_id, results)
        elif isinstance(msg, em.Removed):
            assert self.events is not None
            self.events.rules_removed(client_id, [str(i) for i in msg.ids])
        elif isinstance(msg, em.Stats):
            self.stats[client_id] = _parse_stats(msg.rules)
            run = msg.run
            self.runs[client_id] = run[:64] if isinstance(run, str) else None
        # "ping" needs no answer (any frame proves the link alive); unknown types are
        # ignored for forward compatibility (docs/edge.md).

    def rule_stats(
        self, client_id: str, rule: Rule, per_port: bool, per_target: bool
    ) -> dict[str, Any]:
        """``rules.stats`` for a remote rule from the client's latest ``stats`` frame
        (zeros until one arrived).  Per-port/per-target rows come from the frame when
        the client reports them; otherwise a single-port rule's row is its totals."""
        entry = self.stats.get(client_id, {}).get(rule.id, {})
        out: dict[str, Any] = {"id": int(rule.id) if is_ascii_digits(rule.id) else rule.id}
        out.update({k: _int(entry.get(k)) for k in COUNTERS})
        if per_port:
            ports: dict[int, dict[str, int]] = entry.get("per_port") or {}
            if ports or rule.is_range:
                out["per_port"] = [
                    {"port": p, **ports.get(p, dict.fromkeys(COUNTERS, 0))} for p in rule.ports
                ]
            else:
                out["per_port"] = [{"port": rule.listen_start, **{k: out[k] for k in COUNTERS}}]
        if per_target:
            targets: dict[str, dict[str, Any]] = entry.get("per_target") or {}
            out["per_target"] = [
                {
                    "target": t.label,
                    "priority": t.priority,
                    **targets.get(t.label, {**dict.fromkeys(TARGET_COUNTERS, 0), "up": None}),
                }
                for t in rule.targets
            ]
        return out
