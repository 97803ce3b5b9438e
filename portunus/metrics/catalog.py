"""Every Prometheus series Portunus exports or writes: name, type, labels, help.

The one place a metric name is spelled.  The shards, control, the supervisor and
the web process build their metrics from these entries (``counter()``,
``gauge()``, ``family()``), the readers (``rule-stats``, the edge ``stats``
frames, ``portunus-standalone stats``) look samples up by them, and
docs/reference/metrics.md and the Grafana dashboard are checked against them.

prometheus_client is imported inside the builders only: its value class is
chosen when it is first imported, after the supervisor has exported
PROMETHEUS_MULTIPROC_DIR (see ``portunus.metrics.store``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "portunus_"
# Written for rule-stats (per port, per target) and hidden from /metrics.
DETAIL_PREFIX = "portunus_detail_"
_DEFAULT = object()  # "the default registry" (prometheus_client's REGISTRY)


@dataclass(frozen=True)
class Metric:
    """One series family.  ``name`` is the sample name Prometheus sees (counters
    end in ``_total``); ``mode`` is how /metrics merges a gauge over processes."""

    name: str
    kind: str  # "counter" | "gauge"
    help: str
    labels: tuple[str, ...] = ()
    section: str = ""
    mode: str = ""
    note: str = ""  # extra words for docs/reference/metrics.md

    @property
    def family_name(self) -> str:
        """The family name prometheus_client uses (a counter's without ``_total``)."""
        if self.kind == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        return self.name

    @property
    def exported(self) -> bool:
        return not self.name.startswith(DETAIL_PREFIX)

    def counter(self, registry: Any = _DEFAULT) -> Counter:
        from prometheus_client import REGISTRY, Counter

        assert self.kind == "counter", self.name
        reg = REGISTRY if registry is _DEFAULT else registry
        return Counter(self.name, self.help, self.labels, registry=reg)

    def gauge(self, registry: Any = _DEFAULT) -> Gauge:
        from prometheus_client import REGISTRY, Gauge

        assert self.kind == "gauge", self.name
        reg = REGISTRY if registry is _DEFAULT else registry
        mode: Any = self.mode or "all"
        return Gauge(self.name, self.help, self.labels, registry=reg, multiprocess_mode=mode)

    def family(
        self, labels: tuple[str, ...] | None = None
    ) -> CounterMetricFamily | GaugeMetricFamily:
        """An empty family for a collector to fill (``add_metric``)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        names = list(self.labels if labels is None else labels)
        if self.kind == "counter":
            return CounterMetricFamily(self.family_name, self.help, labels=names)
        return GaugeMetricFamily(self.name, self.help, labels=names)


RULE = ("client", "rule", "owner")
PORT = ("client", "rule", "port")
TARGET = ("client", "rule", "target")
SNI_PORT = ("client", "port")

_R = "Per rule"
_T = "Targets and TLS"
_P = "Processes and clients"
_D = "Detail (not on /metrics)"
SECTIONS = (_R, _T, _P, _D)

RULE_BYTES_IN = Metric(
    "portunus_rule_bytes_in_total",
    "counter",
    "Bytes received from connecting clients (towards the target)",
    RULE,
    _R,
)
RULE_BYTES_OUT = Metric(
    "portunus_rule_bytes_out_total", "counter", "Bytes sent back to connecting clients", RULE, _R
)
RULE_CONNECTIONS = Metric(
    "portunus_rule_connections_total",
    "counter",
    "Accepted connections (TCP) or flows (UDP)",
    RULE,
    _R,
)
RULE_ACTIVE = Metric(
    "portunus_rule_active_connections", "gauge", "Open connections", RULE, _R, mode="livesum"
)
RULE_CONNECT_FAILURES = Metric(
    "portunus_rule_connect_failures_total",
    "counter",
    "Client connections closed because no target could be reached",
    RULE,
    _R,
)
RULE_DATAGRAMS_IN = Metric(
    "portunus_rule_datagrams_in_total", "counter", "UDP datagrams received from clients", RULE, _R
)
RULE_DATAGRAMS_OUT = Metric(
    "portunus_rule_datagrams_out_total", "counter", "UDP datagrams sent back to clients", RULE, _R
)
RULE_STATE = Metric(
    "portunus_rule_state",
    "gauge",
    "1 for the rule's current state (pending, active, failed, draining, revoked), 0 for the others",
    (*RULE, "state"),
    _R,
    # Only control writes it; "live" drops a dead control's file, "mostrecent"
    # lets the newest value win while an old and a new control file coexist.
    mode="livemostrecent",
    note="(server)",
)
UDP_FLOWS = Metric("portunus_udp_flows_active", "gauge", "Open UDP flows", RULE, _R, mode="livesum")
UDP_OVERFLOW = Metric(
    "portunus_udp_flows_dropped_overflow_total",
    "counter",
    "Datagrams dropped because udp_max_flows was reached",
    RULE,
    _R,
)
RATE_LIMIT_REFUSED = Metric(
    "portunus_rate_limit_refused_total",
    "counter",
    "Connections (TCP) or new flows (UDP) refused by a rule's rate limit or its owner's "
    "(limit owner_*)",
    (*RULE, "limit"),
    _R,
    note="`limit` = `new_connections_per_sec`, `concurrent_connections`, "
    "`owner_new_connections` or `owner_concurrent`",
)
RATE_LIMIT_DROPPED = Metric(
    "portunus_rate_limit_dropped_datagrams_total",
    "counter",
    "UDP datagrams dropped because the rule's bandwidth cap was spent",
    (*RULE, "direction"),
    _R,
)
DNS_FAILURES = Metric(
    "portunus_dns_failures_total",
    "counter",
    "Target name resolutions that failed",
    ("client", "rule"),
    _R,
)

TARGET_UP = Metric(
    "portunus_target_up",
    "gauge",
    "1 while a target is considered healthy",
    TARGET,
    _T,
    mode="livemin",
    note="(the minimum over shards)",
)
SNI_ROUTES = Metric(
    "portunus_tls_sni_route_total",
    "counter",
    "SNI dispatches by match kind",
    (*RULE, "result"),
    _T,
    note="`result` = `exact`, `wildcard` or `fallback`",
)
SNI_MISSES = Metric(
    "portunus_tls_sni_listener_miss_total",
    "counter",
    "TLS connections whose SNI matched no rule",
    SNI_PORT,
    _T,
)
SNI_PARSE_FAILURES = Metric(
    "portunus_tls_sni_listener_parse_failures_total",
    "counter",
    "Peeks that were not a ClientHello, timed out or were too large",
    SNI_PORT,
    _T,
)

SHARD_RESTARTS = Metric(
    "portunus_shard_restarts_total",
    "counter",
    "Shards restarted after they died",
    ("shard",),
    _P,
    note="(a series appears at the first restart)",
)
CLIENTS_CONNECTED = Metric(
    "portunus_clients_connected",
    "gauge",
    "Remote edge clients with a live link to this server",
    (),
    _P,
    mode="livemostrecent",
    note="(server)",
)
PREAUTH_REFUSED = Metric(
    "portunus_edge_preauth_refused_total",
    "counter",
    "Edge gateway connections closed before authenticating, by reason",
    ("reason",),
    _P,
    note="(server)",
)
PROCESS_RSS = Metric(
    "portunus_process_resident_memory_bytes",
    "gauge",
    "Resident memory per Portunus process",
    ("process",),
    _P,
)
PROCESS_CPU = Metric(
    "portunus_process_cpu_seconds_total",
    "counter",
    "CPU time per Portunus process",
    ("process",),
    _P,
)
PROCESS_FDS = Metric(
    "portunus_process_open_fds", "gauge", "Open fds per Portunus process", ("process",), _P
)
INSTANCE_INFO = Metric(
    "portunus_instance_info",
    "gauge",
    "The program serving this endpoint",
    ("config", "kind"),
    _P,
    note="(always 1; `kind` = `server`, `client` or `standalone`, `config` = the "
    "standalone config file)",
)

PORT_BYTES_IN = Metric(
    "portunus_detail_port_bytes_in_total",
    "counter",
    "Per-port bytes in (rule-stats --per-port)",
    PORT,
    _D,
)
PORT_BYTES_OUT = Metric(
    "portunus_detail_port_bytes_out_total", "counter", "Per-port bytes out", PORT, _D
)
PORT_CONNECTIONS = Metric(
    "portunus_detail_port_connections_total", "counter", "Per-port connections", PORT, _D
)
PORT_ACTIVE = Metric(
    "portunus_detail_port_active_connections",
    "gauge",
    "Per-port open connections",
    PORT,
    _D,
    mode="livesum",
)
TARGET_CONNECTIONS = Metric(
    "portunus_detail_target_connections_total",
    "counter",
    "Connections established to a target",
    TARGET,
    _D,
)
TARGET_FAILURES = Metric(
    "portunus_detail_target_connect_failures_total",
    "counter",
    "Failed connects to a target",
    TARGET,
    _D,
)

CATALOG: tuple[Metric, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Metric))
BY_NAME = {m.name: m for m in CATALOG}
BY_FAMILY = {m.family_name: m for m in CATALOG}

# What the stats readers (rule-stats, edge stats frames, standalone stats) add up,
# keyed by the sample name, valued by the field of their answer.
RULE_FIELDS = {
    RULE_BYTES_IN.name: "bytes_in",
    RULE_BYTES_OUT.name: "bytes_out",
    RULE_CONNECTIONS.name: "connections_total",
    RULE_ACTIVE.name: "active_connections",
}
PORT_FIELDS = {
    PORT_BYTES_IN.name: "bytes_in",
    PORT_BYTES_OUT.name: "bytes_out",
    PORT_CONNECTIONS.name: "connections_total",
    PORT_ACTIVE.name: "active_connections",
}
TARGET_FIELDS = {
    TARGET_CONNECTIONS.name: "connections_total",
    TARGET_FAILURES.name: "connect_failures_total",
}
