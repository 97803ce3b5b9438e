"""Prometheus series written by the data plane (multiprocess mode).

The supervisor exports PROMETHEUS_MULTIPROC_DIR before this module is imported,
so every value below lands in a per-pid mmap file that /metrics sums over
shards.  Series whose name starts with ``portunus_detail_`` carry per-port and
per-target detail for ``rule-stats``; the /metrics endpoint hides them so the
Prometheus cardinality stays one row per rule however wide a range is.
"""

from __future__ import annotations

import warnings

from portunus.metrics import catalog as c
from portunus.metrics import store

RULE_LABELS = c.RULE

BYTES_IN = c.RULE_BYTES_IN.counter()
BYTES_OUT = c.RULE_BYTES_OUT.counter()
CONNECTIONS = c.RULE_CONNECTIONS.counter()
ACTIVE = c.RULE_ACTIVE.gauge()
CONNECT_FAILURES = c.RULE_CONNECT_FAILURES.counter()
DATAGRAMS_IN = c.RULE_DATAGRAMS_IN.counter()
DATAGRAMS_OUT = c.RULE_DATAGRAMS_OUT.counter()

PORT_LABELS = c.PORT
PORT_BYTES_IN = c.PORT_BYTES_IN.counter()
PORT_BYTES_OUT = c.PORT_BYTES_OUT.counter()
PORT_CONNECTIONS = c.PORT_CONNECTIONS.counter()
PORT_ACTIVE = c.PORT_ACTIVE.gauge()

TARGET_LABELS = c.TARGET
TARGET_UP = c.TARGET_UP.gauge()
TARGET_CONNECTIONS = c.TARGET_CONNECTIONS.counter()
TARGET_FAILURES = c.TARGET_FAILURES.counter()

SNI_ROUTES = c.SNI_ROUTES.counter()
SNI_MISSES = c.SNI_MISSES.counter()
SNI_PARSE_FAILURES = c.SNI_PARSE_FAILURES.counter()

UDP_FLOWS = c.UDP_FLOWS.gauge()
UDP_OVERFLOW = c.UDP_OVERFLOW.counter()
DNS_FAILURES = c.DNS_FAILURES.counter()
RATE_LIMIT_REFUSED = c.RATE_LIMIT_REFUSED.counter()
RATE_LIMIT_DROPPED = c.RATE_LIMIT_DROPPED.counter()


class RuleMeters:
    """The label children of one rule, looked up once (labels() is not free)."""

    __slots__ = ("bytes_in", "bytes_out", "connections", "active", "connect_failures", "labels")

    def __init__(self, client: str, rule: str, owner: str) -> None:
        self.labels = (client, rule, owner)
        self.bytes_in = BYTES_IN.labels(client, rule, owner)
        self.bytes_out = BYTES_OUT.labels(client, rule, owner)
        self.connections = CONNECTIONS.labels(client, rule, owner)
        self.active = ACTIVE.labels(client, rule, owner)
        self.connect_failures = CONNECT_FAILURES.labels(client, rule, owner)


class PortMeters:
    """Per-port detail children of a range rule."""

    __slots__ = ("bytes_in", "bytes_out", "connections", "active")

    def __init__(self, client: str, rule: str, port: int) -> None:
        p = str(port)
        self.bytes_in = PORT_BYTES_IN.labels(client, rule, p)
        self.bytes_out = PORT_BYTES_OUT.labels(client, rule, p)
        self.connections = PORT_CONNECTIONS.labels(client, rule, p)
        self.active = PORT_ACTIVE.labels(client, rule, p)


# Every series labelled with a rule (the SNI listener series are per port).
_PER_RULE = (
    BYTES_IN,
    BYTES_OUT,
    CONNECTIONS,
    ACTIVE,
    CONNECT_FAILURES,
    DATAGRAMS_IN,
    DATAGRAMS_OUT,
    PORT_BYTES_IN,
    PORT_BYTES_OUT,
    PORT_CONNECTIONS,
    PORT_ACTIVE,
    TARGET_UP,
    TARGET_CONNECTIONS,
    TARGET_FAILURES,
    SNI_ROUTES,
    UDP_FLOWS,
    UDP_OVERFLOW,
    DNS_FAILURES,
    RATE_LIMIT_REFUSED,
    RATE_LIMIT_DROPPED,
)


def forget_rule(client: str, rule: str) -> None:
    """Drop this process's label children of a rule that is gone.

    Without this, every rule ever pushed keeps a few objects per series in every
    shard for the life of the process (a soak with rule churn grew shard RSS by
    ~5 KiB per rule).  Its series are retired at once (its runtime may linger in
    a reference cycle until the garbage collector runs), and
    ``store.maybe_compact`` rewrites this shard's multiprocess files without
    them when enough have piled up (checked here, at most every 10 s): until
    then /metrics still shows the rule's last counters, and a rule pushed again
    under the same id (standalone names) continues from them.
    """
    with warnings.catch_warnings():
        # "not implemented in multi-process mode": it drops the in-process child
        # only, which is exactly what is wanted here.
        warnings.simplefilter("ignore", UserWarning)
        for metric in _PER_RULE:
            metric.remove_by_labels({"client": client, "rule": rule})
    store.retire_rule(client, rule)
    store.maybe_compact()
