from __future__ import annotations

import pytest

from portunus.control.slots import check_slot
from portunus.errors import PortunusError
from portunus.rules import Rule, Target, build_rule


def rule(
    rid: str, port: int, end: int | None = None, sni: str | None = None, protocol: str = "tcp"
) -> Rule:
    hi = end or port
    t = Target("10.0.0.1", 1000, port_end=1000 + hi - port if end else None)
    return build_rule(id=rid, protocol=protocol, listen=(port, hi), targets=[t], sni=sni)


def code_of(new: Rule, existing: list[Rule]) -> str | None:
    try:
        check_slot(new, existing)
    except PortunusError as exc:
        return exc.code
    return None


def test_same_port_conflicts_and_names_the_rule() -> None:
    with pytest.raises(PortunusError) as info:
        check_slot(rule("new", 8080), [rule("3", 8080)])
    assert info.value.code == "port_conflict" and info.value.exit_code == 10
    assert info.value.details["conflicting_rule"] == 3
    assert "rule 3" in info.value.message


def test_other_protocol_and_other_port_are_free() -> None:
    assert code_of(rule("n", 8080, protocol="udp"), [rule("1", 8080)]) is None
    assert code_of(rule("n", 8081), [rule("1", 8080)]) is None


@pytest.mark.parametrize(
    ("new", "old", "expected"),
    [
        ((30000, 30099), (30050, 30150), "port_conflict"),  # partial overlap
        ((30000, 30099), (30099, 30099), "port_conflict"),  # single port at the edge
        ((30050, 30050), (30000, 30099), "port_conflict"),  # single port inside a range
        ((30000, 30099), (30100, 30199), None),  # adjacent
    ],
)
def test_ranges(new: tuple[int, int], old: tuple[int, int], expected: str | None) -> None:
    def r(rid: str, lo: int, hi: int) -> Rule:
        return rule(rid, lo, hi if hi != lo else None)

    assert code_of(r("n", *new), [r("1", *old)]) == expected


def test_sni_rules_share_a_port() -> None:
    api = rule("1", 443, sni="api.example.com")
    assert code_of(rule("n", 443, sni="*.example.com"), [api]) is None
    assert code_of(rule("n", 443, sni="api.example.com"), [api]) == "port_conflict"


def test_plain_rule_on_sni_port_becomes_fallback_once() -> None:
    api = rule("1", 443, sni="api.example.com")
    assert code_of(rule("n", 443), [api]) is None
    fallback = rule("2", 443)
    assert code_of(rule("n", 443), [api, fallback]) == "port_conflict"
    assert code_of(rule("n", 443, sni="web.example.com"), [api, fallback]) is None


def test_sni_rule_onto_plain_port_is_refused() -> None:
    with pytest.raises(PortunusError) as info:
        check_slot(rule("n", 443, sni="api.example.com"), [rule("5", 443)])
    assert info.value.code == "conflict.legacy_to_sni_unsupported"
    assert info.value.exit_code == 10 and "remove rule 5" in info.value.message


def test_range_over_sni_port_conflicts() -> None:
    assert code_of(rule("n", 440, 450), [rule("1", 443, sni="a.example.com")]) == "port_conflict"


def test_fallback_of_an_sni_port_is_marked_and_keeps_the_port_in_sni_mode() -> None:
    api = rule("1", 443, sni="api.example.com")
    stored = check_slot(rule("2", 443), [api])
    assert stored.sni_fallback and stored.sni is None
    assert not check_slot(api, []).sni_fallback
    assert not check_slot(rule("3", 8080), []).sni_fallback
    # The SNI rule was removed: only the marked fallback is left.  The port is still
    # in SNI mode: a new SNI rule joins it, a second plain rule is a second fallback.
    assert not check_slot(rule("4", 443, sni="*.example.com"), [stored]).sni_fallback
    assert code_of(rule("5", 443), [stored]) == "port_conflict"


def test_unmarked_plain_rule_keeps_its_port_plain() -> None:
    plain = check_slot(rule("1", 443), [])
    assert (
        code_of(rule("n", 443, sni="api.example.com"), [plain])
        == "conflict.legacy_to_sni_unsupported"
    )
