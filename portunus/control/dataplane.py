"""The seam between the rule service and whatever forwards traffic for a client.

Today there is one link: the local supervisor (``local_link.LocalLink``) serving
the built-in client ``local``.  Remote edges (a later issue) get a second link
behind the same ``DataPlane`` protocol, and ``DataPlanes`` routes by client id,
so the service never knows which kind of node it is talking to.

Links report back through ``DataPlaneEvents`` (implemented by the service).
Calls are synchronous and must not block: the service queues them and applies
them to the store in arrival order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from portunus.rules import Rule

LOCAL = "local"


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What ``clients.list`` shows about a connected node."""

    connected_since: str
    remote_addr: str | None = None
    version: str | None = None
    capabilities: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RuleResult:
    state: str  # "active" | "failed"
    reason: str | None = None


class DataPlaneEvents(Protocol):
    def rules_applied(self, client_id: str, results: dict[str, RuleResult]) -> None:
        """The node answered an apply/sync: per rule id, active or failed(reason)."""

    def rules_removed(self, client_id: str, ids: list[str]) -> None:
        """Removed rules have drained on the node (or it never had them)."""

    def client_connected(self, client_id: str) -> None:
        """The node (re)connected: it must be sent its full rule set."""


class DataPlane(Protocol):
    def connected(self, client_id: str) -> bool: ...

    def info(self, client_id: str) -> LinkInfo | None: ...

    async def apply(self, client_id: str, upsert: Sequence[Rule], remove: Sequence[str]) -> None:
        """Send a change; never raises for a lost link (the node gets the full set
        when it reconnects).  Results arrive later through ``DataPlaneEvents``."""

    async def sync(self, client_id: str, rules: Sequence[Rule]) -> None:
        """Send the full desired set: unchanged rules keep their connections."""

    async def owner_caps(self, client_id: str, caps: dict[str, dict[str, int]]) -> None:
        """Send the node's full set of owner caps ``{owner: rate_limit}``; no answer.
        Like ``apply``, never raises for a lost link (resent on reconnect)."""


class DataPlanes:
    """Routes ``local`` to the local supervisor link and every other client to the
    remote link (none yet: every remote client is "not connected")."""

    def __init__(self, local: DataPlane, remote: DataPlane | None = None) -> None:
        self.local = local
        self.remote = remote

    def _link(self, client_id: str) -> DataPlane | None:
        return self.local if client_id == LOCAL else self.remote

    def connected(self, client_id: str) -> bool:
        link = self._link(client_id)
        return link is not None and link.connected(client_id)

    def info(self, client_id: str) -> LinkInfo | None:
        link = self._link(client_id)
        return link.info(client_id) if link is not None else None

    async def apply(self, client_id: str, upsert: Sequence[Rule], remove: Sequence[str]) -> None:
        link = self._link(client_id)
        if link is not None:
            await link.apply(client_id, upsert, remove)

    async def sync(self, client_id: str, rules: Sequence[Rule]) -> None:
        link = self._link(client_id)
        if link is not None:
            await link.sync(client_id, rules)

    async def owner_caps(self, client_id: str, caps: dict[str, dict[str, int]]) -> None:
        link = self._link(client_id)
        if link is not None:
            await link.owner_caps(client_id, caps)
