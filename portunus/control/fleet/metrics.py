"""Edge gateway series: ``portunus_clients_connected`` and
``portunus_edge_preauth_refused_total{reason}``.

Written only by the control process, so the gauge is ``livemostrecent`` like
``portunus_rule_state``: the supervisor's ``mark_process_dead`` drops a dead
control process's file and the newest value wins if two briefly coexist.
prometheus_client is imported lazily for the reason given in ``control.stats``.
"""

from __future__ import annotations

from portunus.metrics.catalog import CLIENTS_CONNECTED, PREAUTH_REFUSED


class ClientsConnectedGauge:
    def __init__(self) -> None:
        self._gauge = CLIENTS_CONNECTED.gauge(registry=None)

    def __call__(self, count: int) -> None:
        self._gauge.set(float(count))


class PreauthRefusedCounter:
    """``portunus_edge_preauth_refused_total{reason}``: anonymous edge connections
    closed by ``control.fleet.preauth`` (over a limit, oversized first frame, deadline)."""

    def __init__(self) -> None:
        from portunus.control.fleet.preauth import REASONS

        self._counter = PREAUTH_REFUSED.counter(registry=None)
        for reason in REASONS:
            self._counter.labels(reason=reason)

    def __call__(self, reason: str) -> None:
        self._counter.labels(reason=reason).inc()
