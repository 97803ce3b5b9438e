"""The control process's end of the supervisor channel: the data plane of ``local``.

Speaks "Supervisor ↔ rule source" of docs/rpc.md over the socketpair the
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
from portunus.edge.wire import (
    CAPABILITIES,  # the names remote clients advertise, so list-clients reads alike
)
from portunus.logs import log_event
from portunus.rules import Rule
from portunus.supervisor.channel_end import SupervisorEnd
from portunus.supervisor.framing import Channel


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
            {
                "type": "apply",
                "seq": next(self._seq),
                "upsert": [r.to_wire() for r in upsert],
                "remove": [str(i) for i in remove],
            }
        )

    async def sync(self, client_id: str, rules: Sequence[Rule]) -> None:
        self._send({"type": "sync", "seq": next(self._seq), "rules": [r.to_wire() for r in rules]})

    async def owner_caps(self, client_id: str, caps: dict[str, dict[str, int]]) -> None:
        if not self.end.closed:  # not answered: no seq to track
            self.end.send({"type": "owner_caps", "caps": caps})

    def say_up(self) -> None:
        """Tell the supervisor control has fully started (socket served, gateway bound)."""
        self.end.send({"type": "up"})

    # ------------------------------------------------------------------ I/O

    def _send(self, msg: dict[str, Any]) -> None:
        if self.end.closed:
            return  # the close callback is already on its way
        self._inflight.add(msg["seq"])  # every apply/sync is answered by "applied"
        self.end.send(msg)

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "applied":
            seq = msg.get("seq")
            if seq in self._inflight:
                self._inflight.discard(seq)
            else:
                log_event("control.unexpected_seq", level="warning", seq=seq)
            raw = msg.get("results")
            if not isinstance(raw, dict):
                log_event("control.bad_frame", level="warning", type=kind)
                return
            results: dict[str, RuleResult] = {}
            for rule_id, res in raw.items():
                if isinstance(res, dict) and res.get("state") in ("active", "failed"):
                    results[str(rule_id)] = RuleResult(res["state"], res.get("reason"))
            assert self.events is not None
            self.events.rules_applied(LOCAL, results)
        elif kind == "removed":
            ids = msg.get("ids")
            if isinstance(ids, list) and self.events is not None:
                self.events.rules_removed(LOCAL, [str(i) for i in ids])
        elif kind == "retried":
            # A failed rule the supervisor managed to bind later (its port freed).
            raw = msg.get("results")
            if isinstance(raw, dict) and self.events is not None:
                self.events.rules_applied(
                    LOCAL,
                    {
                        str(rid): RuleResult(res["state"], res.get("reason"))
                        for rid, res in raw.items()
                        if isinstance(res, dict) and res.get("state") in ("active", "failed")
                    },
                )
        elif kind == "settings":
            changed = msg.get("settings")
            if isinstance(changed, dict) and self.on_settings is not None:
                self.on_settings(changed)
        elif kind == "hello":
            log_event(
                "control.supervisor_hello", version=msg.get("version"), shards=msg.get("shards")
            )
        else:
            log_event("control.bad_frame", level="warning", type=str(kind))
