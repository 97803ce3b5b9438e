"""portunus.schema: one declaration per body → OpenAPI schemas, validation, wire checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from portunus.bounds import HEALTH_CHECK_INTERVAL, PORT, PRIORITY, RATE_LIMIT_VALUE
from portunus.config import ConfigError, load_standalone
from portunus.errors import ValidationError
from portunus.schema import generate
from portunus.schema.check import _from_msgspec, check, problems, validate
from portunus.schema.rule import RateLimit, RuleBody, RuleUpdate, TargetBody
from portunus.schema.wire import WireRule
from portunus.web.openapi import build_openapi

RULE = {"listen_port": 80, "targets": [{"host": "h", "port": 1}]}


def test_every_body_is_published_and_only_bodies() -> None:
    published = build_openapi()["components"]["schemas"]
    for struct in generate.BODIES:
        assert published[struct.__name__] == generate.schema(struct.__name__)
    assert "WireRule" not in published and "WireRule" in generate.components()


def test_ranges_come_from_bounds() -> None:
    """The published ranges are bounds.py's, not retyped numbers."""
    rule = generate.schema("RuleBody")["properties"]
    target = generate.schema("TargetBody")["properties"]
    caps = generate.schema("RateLimit")["properties"]
    assert (rule["listen_port"]["minimum"], rule["listen_port"]["maximum"]) == (PORT.lo, PORT.hi)
    assert target["priority"]["maximum"] == PRIORITY.hi
    assert rule["health_check_interval_secs"]["minimum"] == HEALTH_CHECK_INTERVAL.lo
    assert all(c["maximum"] == RATE_LIMIT_VALUE.hi for c in caps.values())
    assert caps["bandwidth_in_bps"]["type"] == ["integer", "null"]  # not anyOf: one message


def test_nullable_reference_and_enum_shapes() -> None:
    rule = generate.schema("RuleBody")
    assert rule["properties"]["rate_limit"]["$ref"].endswith("/RateLimit")
    assert generate.schema("RateLimit")["type"] == ["object", "null"]
    assert rule["properties"]["proxy_protocol"]["enum"] == ["v1", "v2", None]
    assert rule["required"] == ["targets"] and rule["additionalProperties"] is False
    assert "title" not in rule


def test_validate_gives_the_typed_struct() -> None:
    body = validate({**RULE, "rate_limit": {"bandwidth_in_bps": 5}}, RuleBody)
    assert isinstance(body, RuleBody) and isinstance(body.targets[0], TargetBody)
    assert body.listen_port == 80 and body.listen_port_start is msgspec.UNSET
    assert isinstance(body.rate_limit, RateLimit) and body.rate_limit.bandwidth_in_bps == 5
    assert body.health_check_interval_secs == 5.0 and body.client == "local"


@pytest.mark.parametrize(
    ("doc", "code", "field"),
    [
        ({**RULE, "listen_port": 0}, "validation.port", "listen_port"),
        ({**RULE, "listen_port": True}, "validation.port", "listen_port"),
        ({**RULE, "targets": [{"host": "h", "port": 1, "priority": 1001}]}, "validation.priority",
         "targets[0].priority"),
        ({**RULE, "health_check_interval_secs": float("nan")},
         "validation.health_check_interval_secs", "health_check_interval_secs"),
        ({**RULE, "nope": 1}, "validation.unknown_field", "nope"),
        ([], "validation.body", "body"),
    ],
)  # fmt: skip
def test_refusals_name_code_and_field(doc: Any, code: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate(doc, RuleBody)
    assert (info.value.code, info.value.details["field"]) == (code, field)
    assert info.value.details["errors"][0]["code"] == code


def test_update_unknown_key_is_immutable_field() -> None:
    with pytest.raises(ValidationError) as info:
        validate({"listen_port": 9}, RuleUpdate)
    assert info.value.code == "validation.immutable_field"
    assert validate({}, RuleUpdate).targets is msgspec.UNSET


def test_msgspec_errors_map_to_the_declared_code() -> None:
    """The fallback when msgspec refuses what the schema let through."""
    p = _from_msgspec("Expected `int` <= 65535 - at `$.targets[0].port`", "RuleBody")
    assert (p.field, p.code) == ("targets[0].port", "validation.port")
    p = _from_msgspec("Expected `int`, got `str` - at `$.rate_limit.bandwidth_in_bps`", "RuleBody")
    assert (p.field, p.code) == ("rate_limit.bandwidth_in_bps", "validation.rate_limit")
    p = _from_msgspec("Object missing required field `targets`", "RuleBody")
    assert (p.field, p.code) == ("", "validation.body")


WIRE = {
    "id": "7",
    "protocol": "tcp",
    "listen_start": 80,
    "listen_end": 80,
    "targets": [{"host": "h", "port": 1, "port_end": None, "priority": 1}],
}


def test_wire_rule_allows_new_keys_and_checks_numbers() -> None:
    assert isinstance(validate({**WIRE, "from_the_future": 1}, WireRule), WireRule)
    for bad, code in [
        ({**WIRE, "listen_end": 70000}, "validation.port"),
        ({**WIRE, "health_check_interval_secs": float("inf")}, "validation.health_check_interval_secs"),
        ({**WIRE, "targets": [{"host": "h", "port": 1, "priority": 0}]}, "validation.priority"),
        ({**WIRE, "rate_limit": {"bandwidth_in_bps": -1}}, "validation.rate_limit"),
        ({**WIRE, "idle_timeout_secs": 0}, "validation.idle_timeout_secs"),
        ({**WIRE, "targets": ["h:1"]}, "validation.targets"),
    ]:  # fmt: skip
        with pytest.raises(ValidationError) as info:
            validate(bad, WireRule)
        assert info.value.code == code, bad


@pytest.mark.parametrize(
    ("toml_value", "json_value", "key"),
    [
        ("3", 3, "prefer_ipv6"),
        ("0.01", 0.01, "health_check_interval_secs"),
        ('"quic"', "quic", "protocol"),
        ('"v3"', "v3", "proxy_protocol"),
    ],
)
def test_a_toml_rule_and_an_http_body_refuse_alike(
    tmp_path: Path, toml_value: str, json_value: Any, key: str
) -> None:
    """Keys a [[rule]] shares with the rule body are checked by one declaration."""
    path = tmp_path / "forward.toml"
    path.write_text(
        f'[[rule]]\nname = "r"\nlisten_port = 80\ntarget = "h:1"\n{key} = {toml_value}\n'
    )
    with pytest.raises(ConfigError) as toml_err:
        load_standalone(str(path))
    with pytest.raises(ValidationError) as body_err:
        validate({**RULE, key: json_value}, RuleBody)
    [line] = toml_err.value.errors
    code, message = body_err.value.code, body_err.value.message
    # The same words; only the body may also say null (TOML has none).
    assert line == f"{path}:5: {code}: {message.replace(', null', '')}"


_KEYS = ["listen_port", "listen_port_start", "listen_port_end", "targets", "protocol", "client"]
_VALUES = st.one_of(
    st.integers(-5, 70_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.none(),
    st.booleans(),
    st.sampled_from(
        [
            [{"host": "h", "port": 1}],
            [{"host": "h", "port_start": 1}],
            [{"host": "h", "port_start": 1, "port_end": 2}],
            [{"host": "h", "port": 1, "port_end": 2}],
            [{"host": "h", "port": 1}, {"host": "h"}],
            {"bandwidth_in_bps": 5},
        ]
    ),
)


@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES))
def test_the_msgspec_fast_path_agrees_with_the_full_schema_walk(doc: dict[str, Any]) -> None:
    """``problems`` lets msgspec accept a body and then checks only the shape rules;
    it must refuse exactly what the full walk over the published schema refuses."""
    full = check(doc, generate.schema("RuleBody"))
    assert bool(problems(doc, "RuleBody")) == bool(full)
    if full:
        assert problems(doc, "RuleBody") == full  # the same report, first problem first


def test_null_is_folded_only_where_it_stays_true() -> None:
    merge = generate._merge_null
    nullable_ref = {"anyOf": [{"$ref": generate.REF + "RateLimit"}, {"type": "null"}]}
    assert merge(nullable_ref) == {"$ref": generate.REF + "RateLimit"}  # RateLimit admits null
    strict_ref = {"anyOf": [{"$ref": generate.REF + "TargetBody"}, {"type": "null"}]}
    assert merge(strict_ref) == strict_ref  # TargetBody does not: keep the anyOf
    clash = {"anyOf": [{"type": "integer", "maximum": 5}, {"type": "number", "maximum": 9}]}
    assert merge(clash) == clash
    assert merge({"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]}) == {
        "type": ["string", "null"],
        "maxLength": 4,
    }
