"""Rule routing half of the supervisor: rules from the source, bindings, and what
every shard must be told (``Supervisor`` in arbiter.py mixes it in).

``RuleBook`` (rulebook.py) decides what is bound; this fans the resulting deltas
out to the shards in the order that keeps them consistent, answers the rule
source, retries failed rules (retry.py) and hands reloaded settings to children.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from portunus.ipc.framing import MAX_FDS_PER_FRAME
from portunus.ipc.messages import (
    Applied,
    Apply,
    Config,
    Drained,
    Listeners,
    Message,
    OwnerCaps,
    Ready,
    Removed,
    Retried,
    Rules,
    Settings,
    Sync,
    outcomes,
)
from portunus.logs import log_event
from portunus.rules import Rule
from portunus.supervisor.children import Child
from portunus.supervisor.listeners import ListenerTable
from portunus.supervisor.notify import Notifier
from portunus.supervisor.retry import RetrySchedule
from portunus.supervisor.rulebook import Delta, RuleBook


class RuleRouter:
    """Rules and settings to children; state lives on the ``Supervisor`` instance."""

    services: list[Child]
    shards: list[Child]
    source_child: Child | None
    listeners: ListenerTable
    book: RuleBook
    retries: RetrySchedule
    notifier: Notifier
    pending_drain: dict[str, set[int]]
    owner_caps: dict[str, dict[str, int]]  # {owner: rate_limit}: the node's owner caps
    shard_settings: dict[str, Any]
    drain_secs: float
    stopping: bool
    clock: Callable[[], float]

    if TYPE_CHECKING:  # provided by the other half of Supervisor

        def send(self, child: Child, msg: Message, fds: list[int] | None = None) -> None: ...

        def status_line(self) -> str: ...

    def on_shard_message(self, shard: Child, msg: Message) -> None:
        shard.last_heartbeat = self.clock()  # any message; Heartbeat says no more
        if isinstance(msg, Ready):
            shard.up = True
        elif isinstance(msg, Drained):
            for rid in msg.ids:
                waiting = self.pending_drain.get(rid)
                if waiting is not None:
                    waiting.discard(shard.index)
            self._finish_drains()

    def on_source_message(self, child: Child, msg: Message) -> None:
        unknown: list[str] = []
        if isinstance(msg, Apply):
            upsert = [Rule.from_wire(w) for w in msg.upsert]
            remove = msg.remove
            # Nothing to drain for a rule we never bound (e.g. one that failed): say so now.
            unknown = [rid for rid in remove if rid not in self.book.rules]
            results, delta = self.book.apply(upsert, remove)
            for rule in upsert:  # an upsert is a fresh try (retry-rule): back off from the start
                if rule.id in self.book.failed_rules:
                    self.retries.restart(rule.id, self.clock())
        elif isinstance(msg, Sync):
            results, delta = self.book.sync([Rule.from_wire(w) for w in msg.rules])
            child.synced = True
        elif isinstance(msg, OwnerCaps):
            # The full set, already validated by the source; no answer is expected.
            self.owner_caps = msg.caps
            for shard in self.shards:
                if shard.alive:
                    self.send(shard, OwnerCaps(caps=self.owner_caps))
            return
        else:
            return
        self.broadcast(delta)
        self.retries.track(set(self.book.failed_rules), self.clock())
        self.send(child, Applied(seq=msg.seq, results=outcomes(results)))
        if unknown:
            self.send(child, Removed(ids=unknown))
        self.notifier.status(self.status_line())

    def apply_sync(self, rules: list[Rule]) -> None:
        _results, delta = self.book.sync(rules)
        self.broadcast(delta)
        self.retries.track(set(self.book.failed_rules), self.clock())
        self.notifier.status(self.status_line())

    def retry_failed(self) -> None:
        """Try again to bind the failed rules that are due (supervisor/retry.py); tell
        the rule source about each that became active."""
        if self.stopping:
            return
        now = self.clock()
        for rid in self.retries.due(now):
            rule = self.book.failed_rules.get(rid)
            if rule is None:
                continue
            results, delta = self.book.apply([rule], [], quiet_failures=True)
            if results.get(rid, {}).get("state") != "active":
                self.retries.failed_again(rid, now)
                continue
            log_event("rule.retry_succeeded", rule=rid)
            self.broadcast(delta)
            if self.source_child is not None:
                self.send(self.source_child, Retried(results=outcomes(results)))
            self.notifier.status(self.status_line())
        self.retries.track(set(self.book.failed_rules), now)

    def broadcast(self, delta: Delta) -> None:
        """Tell every live shard about a change, in the order that keeps it consistent."""
        if not delta:
            return
        for rid in delta.remove:
            self.pending_drain[rid] = {s.index for s in self.shards if s.alive}
        for shard in self.shards:
            if not shard.alive:
                continue  # it gets everything when it is respawned
            self._send_listeners(shard, delta.new_keys)
            self.send(shard, Rules(upsert=[r.to_wire() for r in delta.upsert], remove=delta.remove))
            if delta.gone_keys:
                self.send(shard, Listeners(remove=delta.gone_keys))
        self._finish_drains()

    def _send_listeners(self, shard: Child, keys: list[str] | None) -> None:
        pairs = self.listeners.fds_for_shard(shard.index, keys)
        for i in range(0, len(pairs), MAX_FDS_PER_FRAME):
            batch = pairs[i : i + MAX_FDS_PER_FRAME]
            self.send(shard, Listeners(add=[k for k, _ in batch]), [fd for _, fd in batch])

    def _send_everything(self, shard: Child) -> None:
        self.send(shard, Config(settings=self.shard_settings))
        self._send_listeners(shard, None)
        if self.owner_caps:  # before the rules, so their runtimes start inside the envelopes
            self.send(shard, OwnerCaps(caps=self.owner_caps))
        self.send(shard, Rules(upsert=[r.to_wire() for r in self.book.rules.values()], remove=[]))

    def _finish_drains(self) -> None:
        done = [rid for rid, waiting in self.pending_drain.items() if not waiting]
        if not done:
            return
        for rid in done:
            del self.pending_drain[rid]
        if self.source_child is not None:
            self.send(self.source_child, Removed(ids=done))

    def push_settings(self, changed: dict[str, Any]) -> None:
        """Hand reloaded settings to every live child that reads them (``takes_settings``,
        declared by the process tree), and to respawns to come."""
        if "shutdown_drain_timeout_secs" in changed:
            self.drain_secs = float(changed["shutdown_drain_timeout_secs"])
        for key, value in changed.items():
            if key in self.shard_settings:
                self.shard_settings[key] = value
        for shard in self.shards:
            self.send(shard, Config(settings=self.shard_settings))
        for child in self.services:
            if child.takes_settings:
                self.send(child, Settings(settings=changed))
