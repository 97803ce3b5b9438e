"""The control process's end of the supervisor channel: the data plane of ``local``.

Speaks the supervisor channel (docs/rpc.md, "Process boundaries") over the socketpair the
supervisor forked us with, using the shared non-blocking ``Channel`` driven by
``loop.add_reader``/``add_writer``.  The supervisor owns this process: when the
channel closes, the supervisor is gone (or broke the protocol) and the control
process must exit rather than serve a control plane with no data plane.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Sequence
from typing import Any

from portunus import __version__
from portunus.control.dataplane import LOCAL, DataPlaneEvents, LinkInfo, RuleResult
from portunus.control.store import utc_now
from portunus.ipc.channel_end import SupervisorEnd
from portunus.ipc.edge_wire import (
    CAPABILITIES,  # the names remote clients advertise, so list-clients reads alike
)
from portunus.ipc.framing import Channel
from portunus.ipc.messages import (
    Applied,
    Apply,
    Hello,
    Message,
    Outcomes,
    OwnerCaps,
    Removed,
    Retried,
    Settings,
    Sync,
    Up,
    tag,
)
from portunus.logs import log_event
from portunus.rules import Rule


class LocalLink:
    """``DataPlane`` for the built-in client ``local``."""

    def __init__(
        self,
        sock: socket.socket,
        on_close: Callable[[str], None],
        events: DataPlaneEvents | None = None,
    ) -> None:
        self.end = SupervisorEnd(sock, self._handle, on_close)
        # Set before start(): the service that consumes the events needs this link first.
        self.events = events
        self._seq = itertools.count(1)
        self._inflight: set[int] = set()
        self._since = utc_now()
        # A reload's settings (supervisor/reload.py): applied to the live Settings.
        self.on_settings: Callable[[dict[str, Any]], None] | None = None

    @property
    def channel(self) -> Channel:
        return self.end.channel

    def start(self) -> None:
        """Begin reading frames (inside the running loop of the control process)."""
        assert self.events is not None, "set LocalLink.events before start()"
        self.end.start()

    def close(self) -> None:
        """Stop watching the channel and close it (control shutdown)."""
        self.end.close()

    # ------------------------------------------------------------- DataPlane

    def connected(self, client_id: str) -> bool:
        return client_id == LOCAL and not self.channel.closed

    def info(self, client_id: str) -> LinkInfo | None:
        if not self.connected(client_id):
            return None
        return LinkInfo(
            connected_since=self._since,
            version=__version__,
            capabilities=list(CAPABILITIES),
        )

    async def apply(self, client_id: str, upsert: Sequence[Rule], remove: Sequence[str]) -> None:
        self._send(
            Apply(
                seq=next(self._seq),
                upsert=[r.to_wire() for r in upsert],
                remove=[str(i) for i in remove],
            )
        )

    async def sync(self, client_id: str, rules: Sequence[Rule]) -> None:
        self._send(Sync(seq=next(self._seq), rules=[r.to_wire() for r in rules]))

    async def owner_caps(self, client_id: str, caps: dict[str, dict[str, int]]) -> None:
        if not self.end.closed:  # not answered: no seq to track
            self.end.send(OwnerCaps(caps=caps))

    def say_up(self) -> None:
        """Tell the supervisor control has fully started (socket served, gateway bound)."""
        self.end.send(Up())

    # ------------------------------------------------------------------ I/O

    def _send(self, msg: Apply | Sync) -> None:
        if self.end.closed:
            return  # the close callback is already on its way
        self._inflight.add(msg.seq)  # every apply/sync is answered by "applied"
        self.end.send(msg)

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, Applied):
            if msg.seq in self._inflight:
                self._inflight.discard(msg.seq)
            else:
                log_event("control.unexpected_seq", level="warning", seq=msg.seq)
            assert self.events is not None
            self.events.rules_applied(LOCAL, _results(msg.results))
        elif isinstance(msg, Removed):
            if self.events is not None:
                self.events.rules_removed(LOCAL, msg.ids)
        elif isinstance(msg, Retried):
            # A failed rule the supervisor managed to bind later (its port freed).
            if self.events is not None:
                self.events.rules_applied(LOCAL, _results(msg.results))
        elif isinstance(msg, Settings):
            if self.on_settings is not None:
                self.on_settings(msg.settings)
        elif isinstance(msg, Hello):
            log_event("control.supervisor_hello", version=msg.version, shards=msg.shards)
        else:
            log_event("control.bad_frame", level="warning", type=tag(type(msg)))


def _results(outcomes: Outcomes) -> dict[str, RuleResult]:
    return {rid: RuleResult(o.state, o.reason) for rid, o in outcomes.items()}
