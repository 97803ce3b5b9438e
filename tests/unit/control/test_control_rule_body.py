from __future__ import annotations

from typing import Any

import pytest

from portunus.control.rule_body import parse_rule_body
from portunus.control.rule_update import parse_rule_update
from portunus.errors import PortunusError


def body(**kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"listen_port": 8080, "targets": [{"host": "10.0.0.5", "port": 80}]}
    b.update(kw)
    return {k: v for k, v in b.items() if v is not None}


def err(b: Any, max_ports: int = 1024) -> PortunusError:
    with pytest.raises(PortunusError) as info:
        parse_rule_body(b, max_ports)
    return info.value


def test_minimal_body_defaults() -> None:
    rule, client = parse_rule_body(body(), 1024)
    assert client == "local"
    assert (rule.protocol, rule.listen_start, rule.listen_end) == ("tcp", 8080, 8080)
    assert rule.targets[0].host == "10.0.0.5" and rule.targets[0].priority == 1
    assert rule.health_check_interval_secs == 5.0 and rule.rate_limit is None


def test_range_body() -> None:
    rule, _ = parse_rule_body(
        {
            "client": "edge",
            "protocol": "udp",
            "listen_port_start": 30000,
            "listen_port_end": 30009,
            "targets": [{"host": "upstream.local", "port_start": 40000, "port_end": 40009}],
        },
        1024,
    )
    assert rule.is_range and rule.targets[0].port_end == 40009 and rule.protocol == "udp"


def test_targets_sorted_by_priority_with_proxy_protocol() -> None:
    rule, _ = parse_rule_body(
        body(
            targets=[
                {"host": "b", "port": 2, "priority": 2},
                {"host": "a", "port": 1, "proxy_protocol": "v2"},
            ]
        ),
        1024,
    )
    assert [t.host for t in rule.targets] == ["a", "b"]
    assert rule.targets[0].proxy_protocol == "v2"


@pytest.mark.parametrize(
    ("b", "code", "field"),
    [
        # The shape of the body as a whole (one listen_port xor a range) is blamed on "body",
        # as POST /v1/rules does: both go through the RuleBody declaration.
        (body(listen_port_start=1, listen_port_end=2), "validation.listen_port", "body"),
        ({"targets": [{"host": "a", "port": 1}]}, "validation.listen_port", "body"),
        (body(listen_port=None, listen_port_start=10), "validation.listen_port", "body"),
        (body(listen_port=70000), "validation.port", "listen_port"),
        (body(listen_port="8080-8090"), "validation.port", "listen_port"),
        (
            body(listen_port=None, listen_port_start=20, listen_port_end=10),
            "validation.port_range",
            "listen_port_start",
        ),
        (body(targets=[]), "validation.targets", "targets"),
        (body(targets=[{"host": "a"}]), "validation.targets", "targets[0]"),
        (
            body(targets=[{"host": "a", "port": 1, "weight": 3}]),
            "validation.unknown_field",
            "targets[0].weight",
        ),
        (
            body(targets=[{"host": "a", "port_start": 9, "port_end": 1}]),
            "validation.port_range",
            "targets[0].port_start",
        ),
        (body(listen_port=8080.0), "validation.port", "listen_port"),
        (body(client="  "), "validation.client", "client"),
        (
            body(targets=[{"host": "a", "port": 1, "priority": 0}]),
            "validation.priority",
            "targets[0].priority",
        ),
        (body(targets=[{"host": "bad host", "port": 1}]), "validation.target_host", "host"),
        (body(rate_limt={"bandwidth_in_bps": 1}), "validation.unknown_field", "rate_limt"),
        (body(protocol="sctp"), "validation.protocol", "protocol"),
        (
            body(protocol="udp", sni_pattern="a.example.com"),
            "validation.sni_on_unsupported_rule",
            "sni_pattern",
        ),
        (body(sni_pattern="*"), "validation.sni_pattern", "sni_pattern"),
        (body(prefer_ipv6="yes"), "validation.prefer_ipv6", "prefer_ipv6"),
        (
            body(rate_limit={"bandwidth_in_bps": -1}),
            "validation.rate_limit",
            "rate_limit.bandwidth_in_bps",
        ),
        (
            body(health_check_interval_secs=0),
            "validation.health_check_interval_secs",
            "health_check_interval_secs",
        ),
        (body(client=""), "validation.client", "client"),
    ],
)
def test_invalid_bodies(b: dict[str, Any], code: str, field: str) -> None:
    e = err(b)
    assert e.code == code
    assert e.details.get("field") == field
    assert e.exit_code == 2


def test_range_errors_name_the_listen_fields() -> None:
    big = {
        "listen_port_start": 1000,
        "listen_port_end": 3000,
        "targets": [{"host": "a", "port_start": 1000, "port_end": 3000}],
    }
    e = err(big, max_ports=1024)
    assert e.code == "validation.range_too_large" and e.details["field"] == "listen_port_start"
    mismatch = {
        "listen_port_start": 1000,
        "listen_port_end": 1009,
        "targets": [{"host": "a", "port_start": 1, "port_end": 5}],
    }
    assert err(mismatch).code == "validation.range_length_mismatch"


def test_not_an_object() -> None:
    assert err([1, 2]).code == "validation.body"


def test_numeric_client_reference_is_a_name_or_id() -> None:
    assert parse_rule_body(body(client=7), 1024)[1] == "7"


def test_every_problem_is_listed() -> None:
    e = err({"listen_port": 0, "protocol": "sctp", "targets": [{"host": "", "port": 1}]})
    fields = {p["field"] for p in e.details["errors"]}
    assert {"listen_port", "protocol", "targets[0].host"} <= fields


def test_rule_update() -> None:
    current, _ = parse_rule_body(body(), 1024)
    caps = parse_rule_update({"id": 1, "rate_limit": {"bandwidth_in_bps": 5}}, current)
    assert caps == {"rate_limit": {"bandwidth_in_bps": 5}}
    assert parse_rule_update({"id": 1, "rate_limit": None}, current) == {"rate_limit": None}
    assert parse_rule_update({"id": 1, "rate_limit": {}}, current) == {"rate_limit": None}
    new = parse_rule_update({"id": 1, "targets": [{"host": "b", "port": 81}]}, current)
    assert [t.label for t in new["targets"]] == ["b:81"]
    with pytest.raises(PortunusError) as info:
        parse_rule_update({"id": 1, "rate_limit": {}, "listen_port": 9}, current)
    assert (
        info.value.code == "validation.immutable_field"
        and info.value.details["field"] == "listen_port"
    )
    with pytest.raises(PortunusError) as missing:
        parse_rule_update({"id": 1}, current)
    assert missing.value.code == "validation.rate_limit"
    with pytest.raises(PortunusError) as bad:
        parse_rule_update({"id": 1, "rate_limit": {"bandwidth_in_bps": 0}}, current)
    assert bad.value.details["field"] == "rate_limit.bandwidth_in_bps"
