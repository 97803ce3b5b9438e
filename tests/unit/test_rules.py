"""portunus.rules.parse_port_range (and the target parser built on it): every
valid ``PORT`` / ``LO-HI`` round-trips, everything else is a ValidationError with
a ``validation.*`` code, never a crash."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from portunus.errors import ValidationError
from portunus.rules import Target, build_rule, parse_port_range, parse_target

PORT = st.integers(min_value=1, max_value=65535)
BAD_PORT = st.one_of(st.integers(max_value=0), st.integers(min_value=65536, max_value=10**12))
SPACE = st.sampled_from(["", " ", "  ", "\t"])
VALID_SHAPE = re.compile(r"\s*[0-9]+\s*(-\s*[0-9]+\s*)?")


def fmt(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


@given(PORT, PORT)
def test_range_round_trip(a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    assert parse_port_range(f"{lo}-{hi}") == (lo, hi)
    assert fmt(*parse_port_range(fmt(lo, hi))) == fmt(lo, hi)


@given(PORT, PORT, SPACE, SPACE, SPACE, SPACE)
def test_range_tolerates_spaces(a: int, b: int, s1: str, s2: str, s3: str, s4: str) -> None:
    lo, hi = min(a, b), max(a, b)
    assert parse_port_range(f"{s1}{lo}{s2}-{s3}{hi}{s4}") == (lo, hi)


@given(PORT)
def test_single_port_as_text_and_int(p: int) -> None:
    assert parse_port_range(str(p)) == (p, p)
    assert parse_port_range(p) == (p, p)
    assert parse_port_range(f"{p}-{p}") == (p, p)


@given(PORT, PORT)
def test_reversed_range_rejected(a: int, b: int) -> None:
    assume(a != b)
    lo, hi = min(a, b), max(a, b)
    with pytest.raises(ValidationError) as err:
        parse_port_range(f"{hi}-{lo}", "listen_ports")
    assert err.value.code == "validation.port_range"
    assert err.value.details["field"] == "listen_ports"
    assert f"{hi}-{lo}" in err.value.message


@given(BAD_PORT, PORT)
def test_out_of_range_rejected(bad: int, good: int) -> None:
    candidates: list[str | int] = [bad, str(bad)] if bad >= 0 else [bad]
    if bad >= 0:
        candidates += [f"{bad}-{max(bad, good)}", f"{min(bad, good)}-{bad}"]
    for text in candidates:
        with pytest.raises(ValidationError) as err:
            parse_port_range(text)
        assert err.value.code in ("validation.port", "validation.port_range"), text


@given(st.text(alphabet=string.printable, max_size=20))
def test_ascii_garbage_rejected(text: str) -> None:
    assume(not VALID_SHAPE.fullmatch(text))
    with pytest.raises(ValidationError) as err:
        parse_port_range(text)
    assert err.value.code.startswith("validation.")


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "-",
        "80-",
        "-80",
        "80--90",
        "1-2-3",
        "80 90",
        "0x50",
        "8O",
        "+80",
        "80.0",
        "１-２x",
        "80-90-",
    ],
)
def test_malformed_examples_rejected(text: str) -> None:
    with pytest.raises(ValidationError):
        parse_port_range(text)


@pytest.mark.parametrize("value", [True, False, 80.0, None, [80], {"port": 80}])
def test_non_text_non_int_rejected(value: object) -> None:
    with pytest.raises(ValidationError) as err:
        parse_port_range(value)  # type: ignore[arg-type]
    assert err.value.code == "validation.port"


@pytest.mark.parametrize("text", ["²", "80-⁹⁰"])
def test_non_ascii_digit_garbage_is_a_validation_error(text: str) -> None:
    with pytest.raises(ValidationError):
        parse_port_range(text)


@given(PORT, st.integers(min_value=0, max_value=1000), st.integers(min_value=1, max_value=99))
def test_target_ranges_and_priority(lo: int, span: int, prio: int) -> None:
    hi = min(65535, lo + span)
    t = parse_target(f"10.0.0.5:{fmt(lo, hi)}@{prio}")
    assert (t.host, t.port, t.priority) == ("10.0.0.5", lo, prio)
    assert t.port_end == (hi if hi != lo else None)
    assert t.label == f"10.0.0.5:{fmt(lo, hi)}"


def test_target_reversed_range_rejected() -> None:
    with pytest.raises(ValidationError) as err:
        parse_target("db.example:90-80")
    assert err.value.code == "validation.port_range"


@pytest.mark.parametrize(("rule_pp", "target_pp"), [("v1", None), ("v2", None), (None, "v2")])
def test_udp_rule_refuses_proxy_protocol(rule_pp: str | None, target_pp: str | None) -> None:
    target = Target(host="127.0.0.1", port=53, proxy_protocol=target_pp)
    with pytest.raises(ValidationError) as err:
        build_rule(
            id="u", protocol="udp", listen=(5353, 5353), targets=[target], proxy_protocol=rule_pp
        )
    assert err.value.code == "validation.proxy_protocol"
    assert "TCP-only" in err.value.message
    assert err.value.details["field"] == ("proxy_protocol" if rule_pp else "targets")
    tcp = build_rule(
        id="t", protocol="tcp", listen=(5353, 5353), targets=[target], proxy_protocol=rule_pp
    )
    assert (tcp.proxy_protocol, tcp.targets[0].proxy_protocol) == (rule_pp, target_pp)


def test_sni_fallback_travels_on_the_wire_only_when_set() -> None:
    plain = build_rule(
        id="1", protocol="tcp", listen=(443, 443), targets=[Target(host="10.0.0.1", port=80)]
    )
    assert "sni_fallback" not in plain.to_wire()
    fallback = plain.with_changes(sni_fallback=True)
    assert fallback.to_wire()["sni_fallback"] is True
    assert type(plain).from_wire(fallback.to_wire()) == fallback != plain
    assert type(plain).from_wire(plain.to_wire()) == plain
