"""users.list, grants.list and tokens.list: keyset pages, filters and index totals
(control.account_lists, store.account_pages)."""

from __future__ import annotations

from typing import Any

import pytest

from portunus.control.store import accounts, utc_now
from portunus.control.store import users as users_db
from portunus.control.store.paging import encode_cursor

from .conftest import expect_error
from .rbac_harness import Rbac


async def _users(rbac: Rbac, names: list[str], role: str = "user") -> list[int]:
    async with rbac.store.write() as db:
        return [
            await users_db.insert_user(db, n, role, None, None, False, utc_now()) for n in names
        ]


async def _grants(rbac: Rbac, user_id: int, client_id: str, n: int) -> list[int]:
    async with rbac.store.write() as db:
        return [
            await users_db.insert_grant(
                db, user_id, client_id, 1000 + i, 1000 + i, ("tcp",), None, utc_now()
            )
            for i in range(n)
        ]


async def _walk(
    rbac: Rbac, method: str, key: str, field: str, **params: Any
) -> tuple[list[Any], int]:
    rows: list[Any] = []
    cursor, calls = None, 0
    while True:
        got = await rbac.call(method, {**params, **({"cursor": cursor} if cursor else {})})
        calls += 1
        rows += [r[field] for r in got[key]]
        cursor = got["next_cursor"]
        if cursor is None:
            return rows, calls


async def test_users_page_by_user_id_with_role_and_prefix(rbac: Rbac) -> None:
    names = [f"u{i:03}" for i in range(25)]
    await _users(rbac, names)
    await _users(rbac, ["root1", "root2"], role="superadmin")
    everyone = ["operator", "root1", "root2", *names]
    walked, calls = await _walk(rbac, "users.list", "users", "user_id", limit=10)
    assert walked == sorted(everyone) and calls == 3
    first = await rbac.call("users.list", {"limit": 10})
    assert first["total"] == 28 and len(first["users"]) == 10
    supers = await rbac.call("users.list", {"role": "superadmin"})
    assert [u["user_id"] for u in supers["users"]] == ["operator", "root1", "root2"]
    assert supers["total"] == 3 and supers["next_cursor"] is None
    prefixed, _ = await _walk(rbac, "users.list", "users", "user_id", name_prefix="u01", limit=4)
    assert prefixed == [f"u01{i}" for i in range(10)]
    assert (await rbac.call("users.list", {"name_prefix": "u0%"}))["total"] == 0  # no LIKE
    default = await rbac.call("users.list")
    assert len(default["users"]) == 28 and default["next_cursor"] is None


async def test_users_pages_keep_every_existing_user_while_users_are_added(rbac: Rbac) -> None:
    await _users(rbac, [f"m{i:02}" for i in range(30)])
    before = {u["user_id"] for u in (await rbac.call("users.list", {"limit": 1000}))["users"]}
    got = await rbac.call("users.list", {"limit": 6})
    seen = [u["user_id"] for u in got["users"]]
    cursor, round_ = got["next_cursor"], 0
    while cursor:
        round_ += 1
        # one user sorting before the pages read, one after them
        await _users(rbac, [f"a{round_:02}", f"z{round_:02}"])
        got = await rbac.call("users.list", {"limit": 6, "cursor": cursor})
        seen += [u["user_id"] for u in got["users"]]
        cursor = got["next_cursor"]
    assert len(seen) == len(set(seen)) and seen == sorted(seen)
    assert before <= set(seen)


async def test_grants_page_by_id_with_user_and_client_filters(rbac: Rbac) -> None:
    async with rbac.store.write() as db:
        edge = (await accounts.insert_client(db, "edge-01")).client_id
    alice, bob = await _users(rbac, ["alice", "bob"])
    a_local = await _grants(rbac, alice, "local", 4)
    b_edge = await _grants(rbac, bob, edge, 3)
    a_any = await _grants(rbac, alice, "*", 2)
    walked, calls = await _walk(rbac, "grants.list", "grants", "grant_id", limit=4)
    assert walked == a_local + b_edge + a_any and calls == 3
    mine, _ = await _walk(rbac, "grants.list", "grants", "grant_id", user_id="alice", limit=3)
    assert mine == a_local + a_any
    by_name = await rbac.call("grants.list", {"client": "edge-01", "limit": 2})
    assert [g["grant_id"] for g in by_name["grants"]] == b_edge[:2] and by_name["total"] == 3
    star = await rbac.call("grants.list", {"client": "*", "user_id": "alice"})
    assert [g["grant_id"] for g in star["grants"]] == a_any and star["total"] == 2
    await expect_error(rbac.call("grants.list", {"client": "ghost"}), "client_not_found")


async def test_a_user_pages_only_their_own_grants_and_tokens(rbac: Rbac) -> None:
    token = await rbac.user("alice")
    await rbac.user("bob")
    alice = await rbac.call("users.get", {"user_id": "alice"})
    assert alice["user_id"] == "alice"
    for _ in range(3):
        await rbac.call("tokens.issue", {"user_id": "alice"})
        await rbac.call("tokens.issue", {"user_id": "bob"})
    own = await rbac.call("tokens.list", {"limit": 2}, token=token)
    assert own["total"] == 4 and len(own["tokens"]) == 2 and own["next_cursor"]
    rest = await rbac.call("tokens.list", {"limit": 2, "cursor": own["next_cursor"]}, token=token)
    assert {t["user_id"] for t in own["tokens"] + rest["tokens"]} == {"alice"}
    assert rest["next_cursor"] is None
    everyone, _ = await _walk(rbac, "tokens.list", "tokens", "token_id", limit=3)
    assert everyone == sorted(everyone) and len(everyone) == 9  # + the operator token
    await expect_error(rbac.call("tokens.list", {"user_id": "bob"}, token=token), "role_required")


@pytest.mark.parametrize(
    ("method", "kind", "wrong"),
    [
        ("users.list", "users", [3]),
        ("grants.list", "grants", ["3"]),
        ("tokens.list", "tokens", [-1]),
        ("grants.list", "tokens", [1]),  # another list's cursor
    ],
)
async def test_tampered_or_foreign_cursor_is_validation_cursor(
    rbac: Rbac, method: str, kind: str, wrong: list[Any]
) -> None:
    await expect_error(
        rbac.call(method, {"cursor": encode_cursor(kind, wrong)}), "validation.cursor"
    )
    await expect_error(rbac.call(method, {"cursor": "AAAAAAAAAAAA"}), "validation.cursor")


async def test_bad_list_params_are_validation_errors(rbac: Rbac) -> None:
    await expect_error(rbac.call("users.list", {"limit": 1001}), "validation.limit")
    await expect_error(rbac.call("users.list", {"role": "admin"}), "validation.role")
    await expect_error(rbac.call("users.list", {"name_prefix": "x" * 65}), "validation.name_prefix")
    await expect_error(rbac.call("grants.list", {"limit": 0}), "validation.limit")
    await expect_error(rbac.call("tokens.list", {"offset": 3}), "validation.unknown_field")


async def test_account_counts_are_index_searches(rbac: Rbac) -> None:
    queries = [
        ("SELECT COUNT(*) FROM users WHERE role = ?", ("user",)),
        ("SELECT COUNT(*) FROM users WHERE name >= ? AND name < ?", ("a", "b")),
        ("SELECT COUNT(*) FROM grants g WHERE g.user_id = ?", (1,)),
        ("SELECT COUNT(*) FROM grants g WHERE g.client_id = ?", ("*",)),
        ("SELECT COUNT(*) FROM tokens t WHERE t.user_id = ?", (1,)),
        # ?client=NAME of rules.list and grants.list resolves revoked clients too
        ("SELECT * FROM clients WHERE name = ? ORDER BY client_id", ("edge-01",)),
    ]
    async with rbac.store.read() as db:
        for sql, args in queries:
            async with db.execute("EXPLAIN QUERY PLAN " + sql, args) as cur:
                plan = " | ".join(str(row[3]) for row in await cur.fetchall())
            assert "SEARCH" in plan, (sql, plan)
