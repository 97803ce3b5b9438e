"""Load shedding at ``hello``: a busy server says so, with a ``retry_after``.

After a server restart the whole fleet reconnects at once.  Each ``hello`` puts
work on the rule service's event queue (a full ``sync`` out, an ``applied`` back
to record); the queue drains at the rate the store can write.  When it is deeper
than ``BUSY_BACKLOG`` events, another authenticated ``hello`` is answered
``{"type": "error", "code": "busy", "retry_after": s, "message"}`` and closed,
instead of joining a queue it would wait in anyway while holding a connection.
``retry_after`` grows with the backlog (``RETRY_PER_LIMIT`` seconds per
``BUSY_BACKLOG`` queued, 1 to ``RETRY_MAX`` s); the client waits that long times a
random factor in [1, 2) (``portunus.edge.timing.busy_delay``), so the refused
wave comes back spread out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from portunus.ipc.edge_messages import Error

BUSY_BACKLOG = 2000
RETRY_PER_LIMIT = 2.0
RETRY_MAX = 60


class Shedder:
    """Decides, per ``hello``, whether the server is too busy to take one more link."""

    def __init__(self, backlog: Callable[[], int] | None, limit: int = BUSY_BACKLOG) -> None:
        self.backlog = backlog or (lambda: 0)
        self.limit = limit
        self.refused = 0

    def retry_after(self) -> int | None:
        """Seconds to ask the client to wait, or None to let it in."""
        queued = self.backlog()
        if queued < self.limit:
            return None
        return max(1, min(RETRY_MAX, math.ceil(RETRY_PER_LIMIT * queued / self.limit)))

    def busy_frame(self, retry_after: int) -> Error:
        self.refused += 1
        return Error(
            code="busy",
            retry_after=retry_after,
            message=f"the server is reconciling {self.backlog()} queued client events; retry in {retry_after} s",
        )
