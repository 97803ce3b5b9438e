"""``portunus_clients_connected``: remote clients with a live session.

Written only by the control process, so ``livemostrecent`` like
``portunus_rule_state``: the supervisor's ``mark_process_dead`` drops a dead
control process's file and the newest value wins if two briefly coexist.
prometheus_client is imported lazily for the reason given in ``control.stats``.
"""

from __future__ import annotations


class ClientsConnectedGauge:
    def __init__(self) -> None:
        from prometheus_client import Gauge

        self._gauge = Gauge(
            "portunus_clients_connected",
            "Remote edge clients with a live link to this server",
            multiprocess_mode="livemostrecent",
            registry=None,
        )

    def __call__(self, count: int) -> None:
        self._gauge.set(float(count))
