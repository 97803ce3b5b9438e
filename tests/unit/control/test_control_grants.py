"""Grants: the push check (one grant must cover it all, refusals in contract
order), and the user/grant cascades through the ordinary remove path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portunus.control.grants import check_grants
from portunus.control.store.users import GrantRow
from portunus.errors import PortunusError

from .conftest import expect_error
from .rbac_harness import Rbac


def _grant(
    client: str = "c1", lo: int = 100, hi: int = 199, protocols: tuple[str, ...] = ("tcp",)
) -> GrantRow:
    return GrantRow(1, 1, "alice", client, None, lo, hi, protocols, None, "t")


def _code(grants: list[GrantRow], client: str, proto: str, lo: int, hi: int) -> str | None:
    try:
        check_grants(grants, "alice", client, client, proto, lo, hi)
    except PortunusError as exc:
        return exc.code
    return None


def test_refusal_order() -> None:
    grants = [_grant()]
    assert _code(grants, "c2", "udp", 1, 1) == "client_not_granted"
    assert _code(grants, "c1", "udp", 1, 1) == "protocol_not_granted"
    assert _code(grants, "c1", "tcp", 1, 1) == "port_outside_grant"
    assert _code(grants, "c1", "tcp", 100, 199) is None
    assert _code([_grant("*")], "anything", "tcp", 150, 150) is None
    assert _code([], "c1", "tcp", 100, 100) == "client_not_granted"


def test_adjacent_grants_do_not_add_up() -> None:
    grants = [_grant(lo=100, hi=149), _grant(lo=150, hi=199)]
    assert _code(grants, "c1", "tcp", 140, 160) == "port_outside_grant"
    assert _code(grants, "c1", "tcp", 150, 160) is None


@given(st.integers(1, 300), st.integers(0, 50))
def test_covered_exactly_when_inside_one_grant(lo: int, length: int) -> None:
    grants = [_grant(lo=100, hi=149), _grant(lo=150, hi=199)]
    hi = lo + length
    inside = any(g.port_start <= lo and hi <= g.port_end for g in grants)
    assert (_code(grants, "c1", "tcp", lo, hi) is None) == inside


PUSH: dict[str, Any] = {"targets": [{"host": "127.0.0.1", "port": 9}]}


async def _setup(h: Rbac) -> str:
    token = await h.user("alice")
    await h.call(
        "grants.add",
        {
            "user_id": "alice",
            "client": "local",
            "listen_port_start": 30000,
            "listen_port_end": 30009,
        },
    )
    await h.call(
        "grants.add",
        {
            "user_id": "alice",
            "client": "*",
            "listen_port_start": 30100,
            "listen_port_end": 30100,
            "protocols": ["tcp", "udp"],
        },
    )
    return token


async def test_grant_revoke_removes_only_uncovered_rules(rbac: Rbac) -> None:
    token = await _setup(rbac)
    a = await rbac.call("rules.push", {**PUSH, "listen_port": 30001}, token=token)
    b = await rbac.call(
        "rules.push", {**PUSH, "listen_port": 30100, "protocol": "udp"}, token=token
    )
    assert a["owner"] == b["owner"] == "alice"
    grants = (await rbac.call("grants.list", {}, token=token))["grants"]
    first = grants[0]["grant_id"]
    out = await rbac.call("grants.revoke", {"grant_id": first})
    assert out == {"grant_id": first, "removed_rule_ids": [a["id"]]}
    assert ["1"] in [s[3] for s in rbac.plane.applies()]  # told to the data plane like remove-rule
    await expect_error(rbac.call("grants.revoke", {"grant_id": first}), "grant_not_found")
    assert [r["id"] for r in (await rbac.call("rules.list", token=token))["rules"]] == [
        a["id"],
        b["id"],
    ]


async def test_user_remove_cascades(rbac: Rbac) -> None:
    token = await _setup(rbac)
    session = await rbac.login("alice")
    rule = await rbac.call("rules.push", {**PUSH, "listen_port": 30002}, token=token)
    root_rule = await rbac.call("rules.push", {**PUSH, "listen_port": 31000})
    tokens = [
        t["token_id"] for t in (await rbac.call("tokens.list", {"user_id": "alice"}))["tokens"]
    ]
    out = await rbac.call("users.remove", {"user_id": "alice"})
    assert out["user_id"] == "alice" and out["removed_rule_ids"] == [rule["id"]]
    assert len(out["revoked_grant_ids"]) == 2 and out["revoked_token_ids"] == tokens
    await expect_error(rbac.call("rules.list", token=token), "unauthenticated")
    await expect_error(rbac.call("users.me", token=None, session=session), "unauthenticated")
    assert (await rbac.call("rules.get", {"id": root_rule["id"]}))[
        "owner"
    ] == ""  # operator token: no owner
    await expect_error(rbac.call("users.remove", {"user_id": "alice"}), "user_not_found")


async def test_superadmin_guards(rbac: Rbac) -> None:
    root = await rbac.user("root", role="superadmin")
    err = await expect_error(
        rbac.call("users.remove", {"user_id": "root"}, token=root), "cannot_remove_self"
    )
    assert err.exit_code == 10
    await expect_error(rbac.call("users.remove", {"user_id": "root"}), "last_superadmin")
    root2 = await rbac.user("root2", role="superadmin")
    assert (await rbac.call("users.remove", {"user_id": "root"}))["user_id"] == "root"
    await expect_error(rbac.call("users.remove", {"user_id": "operator"}, token=root2), "conflict")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"user_id": "Alice"}, "validation.user_id"),
        ({"user_id": "a" * 33}, "validation.user_id"),
        ({"user_id": "9lives"}, "validation.user_id"),
        ({"user_id": "ok", "role": "admin"}, "validation.role"),
        ({"user_id": "ok", "display_name": ""}, "validation.display_name"),
        ({"user_id": "ok", "display_name": "x" * 65}, "validation.display_name"),
        ({"user_id": "ok", "password": "short"}, "validation.password_too_short"),
        ({"user_id": "ok", "colour": "red"}, "validation.unknown_field"),
        ({"user_id": "ok", "password": 12345678901234}, "validation.password"),
    ],
)
async def test_user_validation(rbac: Rbac, body: dict[str, Any], code: str) -> None:
    err = await expect_error(rbac.call("users.add", body), code)
    assert err.exit_code == 2


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"listen_port_start": 10, "listen_port_end": 5}, "validation.port_range"),
        ({"listen_port_start": 0, "listen_port_end": 5}, "validation.port_range"),
        ({"listen_port_start": 1, "listen_port_end": 5, "protocols": []}, "validation.protocols"),
        (
            {"listen_port_start": 1, "listen_port_end": 5, "protocols": ["icmp"]},
            "validation.protocols",
        ),
        ({"listen_port_start": 1, "listen_port_end": 5, "client": "nowhere"}, "client_not_found"),
        ({"listen_port_start": 1}, "validation.port_range"),
        ({"listen_port_start": 1, "listen_port_end": 5, "colour": 1}, "validation.unknown_field"),
        ({"listen_port_start": 1, "listen_port_end": 5, "user_id": "ghost"}, "user_not_found"),
    ],
)
async def test_grant_validation(rbac: Rbac, body: dict[str, Any], code: str) -> None:
    await rbac.user("alice")
    await expect_error(
        rbac.call("grants.add", {"user_id": "alice", "client": "local", **body}), code
    )
    assert (await rbac.call("users.add", {"user_id": "dup"}))["temporary_password"]
    await expect_error(rbac.call("users.add", {"user_id": "dup"}), "user_exists")


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"name": ""}, "validation.name"),
        ({"name": "x" * 65}, "validation.name"),
        ({"name": 7}, "validation.name"),
        ({"name": "tab\there"}, "validation.name"),  # not printable: the semantic check
        ({"colour": "red"}, "validation.unknown_field"),
    ],
)
async def test_token_validation(rbac: Rbac, extra: dict[str, Any], code: str) -> None:
    await rbac.user("alice")
    await expect_error(rbac.call("tokens.issue", {"user_id": "alice", **extra}), code)
