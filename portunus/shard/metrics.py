"""Prometheus series written by the data plane (multiprocess mode).

The supervisor exports PROMETHEUS_MULTIPROC_DIR before this module is imported,
so every value below lands in a per-pid mmap file that /metrics sums over
shards.  Series whose name starts with ``portunus_detail_`` carry per-port and
per-target detail for ``rule-stats``; the /metrics endpoint hides them so the
Prometheus cardinality stays one row per rule however wide a range is.
"""

from __future__ import annotations

import warnings

from prometheus_client import Counter, Gauge

RULE_LABELS = ("client", "rule", "owner")

BYTES_IN = Counter(
    "portunus_rule_bytes_in_total",
    "Bytes received from connecting clients (towards the target)",
    RULE_LABELS,
)
BYTES_OUT = Counter(
    "portunus_rule_bytes_out_total", "Bytes sent back to connecting clients", RULE_LABELS
)
CONNECTIONS = Counter(
    "portunus_rule_connections_total", "Accepted connections (TCP) or flows (UDP)", RULE_LABELS
)
ACTIVE = Gauge(
    "portunus_rule_active_connections", "Open connections", RULE_LABELS, multiprocess_mode="livesum"
)
CONNECT_FAILURES = Counter(
    "portunus_rule_connect_failures_total",
    "Client connections closed because no target could be reached",
    RULE_LABELS,
)
DATAGRAMS_IN = Counter(
    "portunus_rule_datagrams_in_total", "UDP datagrams received from clients", RULE_LABELS
)
DATAGRAMS_OUT = Counter(
    "portunus_rule_datagrams_out_total", "UDP datagrams sent back to clients", RULE_LABELS
)

PORT_LABELS = ("client", "rule", "port")
PORT_BYTES_IN = Counter(
    "portunus_detail_port_bytes_in_total", "Per-port bytes in (rule-stats --per-port)", PORT_LABELS
)
PORT_BYTES_OUT = Counter("portunus_detail_port_bytes_out_total", "Per-port bytes out", PORT_LABELS)
PORT_CONNECTIONS = Counter(
    "portunus_detail_port_connections_total", "Per-port connections", PORT_LABELS
)
PORT_ACTIVE = Gauge(
    "portunus_detail_port_active_connections",
    "Per-port open connections",
    PORT_LABELS,
    multiprocess_mode="livesum",
)

TARGET_LABELS = ("client", "rule", "target")
TARGET_UP = Gauge(
    "portunus_target_up",
    "1 while a target is considered healthy",
    TARGET_LABELS,
    multiprocess_mode="livemin",
)
TARGET_CONNECTIONS = Counter(
    "portunus_detail_target_connections_total", "Connections established to a target", TARGET_LABELS
)
TARGET_FAILURES = Counter(
    "portunus_detail_target_connect_failures_total", "Failed connects to a target", TARGET_LABELS
)

SNI_ROUTES = Counter(
    "portunus_tls_sni_route_total", "SNI dispatches by match kind", RULE_LABELS + ("result",)
)
SNI_MISSES = Counter(
    "portunus_tls_sni_listener_miss_total",
    "TLS connections whose SNI matched no rule",
    ("client", "port"),
)
SNI_PARSE_FAILURES = Counter(
    "portunus_tls_sni_listener_parse_failures_total",
    "Peeks that were not a ClientHello, timed out or were too large",
    ("client", "port"),
)

UDP_FLOWS = Gauge(
    "portunus_udp_flows_active", "Open UDP flows", RULE_LABELS, multiprocess_mode="livesum"
)
UDP_OVERFLOW = Counter(
    "portunus_udp_flows_dropped_overflow_total",
    "Datagrams dropped because udp_max_flows was reached",
    RULE_LABELS,
)
DNS_FAILURES = Counter(
    "portunus_dns_failures_total", "Target name resolutions that failed", ("client", "rule")
)


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
)


def forget_rule(client: str, rule: str) -> None:
    """Drop this process's label children of a rule that is gone.

    Without this, every rule ever pushed keeps a few objects per series in every
    shard for the life of the process (a soak with rule churn grew shard RSS by
    ~5 KiB per rule).  The values stay in the multiprocess files, so /metrics
    keeps showing the rule's last counters until restart as before; a rule pushed
    again under the same id (standalone names) picks its counters up from there.
    """
    with warnings.catch_warnings():
        # "not implemented in multi-process mode": it drops the in-process child
        # only, which is exactly what is wanted here.
        warnings.simplefilter("ignore", UserWarning)
        for metric in _PER_RULE:
            metric.remove_by_labels({"client": client, "rule": rule})
