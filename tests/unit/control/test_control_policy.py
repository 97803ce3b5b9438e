"""The one authorization function: every RPC method has a policy, and none but
the public ones answers without an identity."""

from __future__ import annotations

import pytest

from portunus.control.auth import Principal
from portunus.control.policy import POLICY, PUBLIC, READS, SUPERADMIN, authorize
from portunus.control.rpc.handlers import METHODS
from portunus.errors import PortunusError

from .conftest import expect_error
from .rbac_harness import Rbac

USER = Principal(5, "alice", "user", 9)
ADMIN = Principal(1, "root", "superadmin", 1)


def test_every_method_has_a_policy() -> None:
    assert set(METHODS) <= set(POLICY), sorted(set(METHODS) - set(POLICY))
    assert READS <= set(POLICY)
    # Owner caps are built elsewhere; they are superadmin-only from day one.
    for method in ("owner_caps.list", "owner_caps.get", "owner_caps.set", "owner_caps.delete"):
        assert POLICY[method] == SUPERADMIN


def test_method_flags_agree_with_the_policy() -> None:
    for method, (needs_identity, _handler) in METHODS.items():
        assert needs_identity == (POLICY[method] != PUBLIC), method


def test_public_methods_are_exactly_these() -> None:
    assert {m for m, level in POLICY.items() if level == PUBLIC} == {
        "health",
        "auth.login",
        "auth.setup",
    }


@pytest.mark.parametrize("method", sorted(m for m, level in POLICY.items() if level == SUPERADMIN))
def test_superadmin_methods_refuse_users(method: str) -> None:
    with pytest.raises(PortunusError) as info:
        authorize(method, USER, csrf=True)
    assert info.value.code == "role_required" and info.value.exit_code == 9
    authorize(method, ADMIN, csrf=True)


def test_unknown_policy_is_refused_not_served() -> None:
    with pytest.raises(PortunusError) as info:
        authorize("made.up", ADMIN, csrf=True)
    assert info.value.code == "internal"


@pytest.mark.parametrize("method", sorted(m for m in METHODS if POLICY[m] != PUBLIC))
async def test_no_method_answers_without_identity(rbac: Rbac, method: str) -> None:
    for token, session in ((None, None), ("not-a-token", None), (None, "not-a-session")):
        err = await expect_error(
            rbac.call(method, {"id": 1}, token=token, session=session), "unauthenticated"
        )
        assert err.exit_code == 4
    denied = [
        e
        for e in (await rbac.call("audit.list", {"limit": 10}))["entries"]
        if e["action"] == f"denied.{method}"
    ]
    assert len(denied) == 3 and {e["error_code"] for e in denied} == {"unauthenticated"}
    assert all(e["actor"] == "anonymous" for e in denied)
