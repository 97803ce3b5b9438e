"""rules.list filters and keyset paging (control.rule_list, store.paging) and
rules.counts: applied by control in SQL, so a page of 10,000 rules reads one page."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from portunus.control.store import accounts
from portunus.control.store import rules as rules_db
from portunus.control.store.paging import encode_cursor
from portunus.rules import Target, build_rule

from .conftest import expect_error


async def _push(harness: Any, port: int, protocol: str = "tcp") -> int:
    rule = await harness.call(
        "rules.push",
        {"listen_port": port, "protocol": protocol, "targets": [{"host": "127.0.0.1", "port": 9}]},
    )
    return int(rule["id"])


async def _insert(harness: Any, n: int, client_id: str = "local", owner: str = "") -> list[int]:
    """``n`` rules written straight to the store (paging does not care about activation)."""
    async with harness.store.write() as db:
        ids = []
        for _ in range(n):
            port = 20000 + len(ids) + int(await _max_id(db))
            rule = build_rule(
                id="0", protocol="tcp", listen=(port, port), targets=[Target("127.0.0.1", 9)]
            )
            ids.append(await rules_db.insert_rule(db, client_id, rule.with_changes(owner=owner)))
        return ids


async def _max_id(db: Any) -> int:
    async with db.execute("SELECT COALESCE(MAX(id), 0) FROM rules") as cur:
        return int((await cur.fetchone())[0])


async def _walk(harness: Any, **params: Any) -> tuple[list[int], int]:
    """Every page of rules.list: the ids in order and the number of calls."""
    ids: list[int] = []
    cursor, calls = None, 0
    while True:
        got = await harness.call("rules.list", {**params, **({"cursor": cursor} if cursor else {})})
        calls += 1
        ids += [r["id"] for r in got["rules"]]
        cursor = got["next_cursor"]
        if cursor is None:
            return ids, calls


async def test_paging_and_filters(harness: Any) -> None:
    ids = [await _push(harness, 31000 + i, "udp" if i % 3 == 0 else "tcp") for i in range(7)]
    first = await harness.call("rules.list", {"limit": 3})
    assert [r["id"] for r in first["rules"]] == ids[:3] and first["total"] == 7
    second = await harness.call("rules.list", {"limit": 3, "cursor": first["next_cursor"]})
    assert [r["id"] for r in second["rules"]] == ids[3:6] and second["total"] == 7
    last = await harness.call("rules.list", {"limit": 3, "cursor": second["next_cursor"]})
    assert [r["id"] for r in last["rules"]] == ids[6:] and last["next_cursor"] is None
    udp = await harness.call("rules.list", {"protocol": "udp", "limit": 2})
    assert [r["id"] for r in udp["rules"]] == [ids[0], ids[3]] and udp["total"] == 3
    rest = await harness.call("rules.list", {"protocol": "udp", "cursor": udp["next_cursor"]})
    assert [r["id"] for r in rest["rules"]] == [ids[6]] and rest["next_cursor"] is None
    assert (await harness.call("rules.list", {"state": "failed", "limit": 5})) == {
        "rules": [],
        "next_cursor": None,
        "total": 0,
    }
    counts = await harness.call("rules.counts")
    assert counts == {
        "by_state": {"pending": 0, "active": 7, "failed": 0, "draining": 0, "revoked": 0},
        "total": 7,
    }


async def test_default_page_is_100_and_walks_every_rule_once(harness: Any) -> None:
    ids = await _insert(harness, 150)
    first = await harness.call("rules.list")
    assert len(first["rules"]) == 100 and first["total"] == 150 and first["next_cursor"]
    walked, calls = await _walk(harness)
    assert walked == ids and calls == 2
    exact, calls = await _walk(harness, limit=50)
    assert exact == ids and calls == 3  # the third page is full: the cursor says so


async def test_client_and_owner_filters_page_and_count(harness: Any) -> None:
    async with harness.store.write() as db:
        edge = (await accounts.insert_client(db, "edge-01")).client_id
    mine = await _insert(harness, 5, owner="alice")
    theirs = await _insert(harness, 4, client_id=edge, owner="bob")
    more_mine = await _insert(harness, 3, client_id=edge, owner="alice")
    assert (await _walk(harness, owner="alice", limit=2))[0] == mine + more_mine
    assert (await _walk(harness, client="edge-01", limit=3))[0] == theirs + more_mine
    both = await harness.call("rules.list", {"client": edge, "owner": "alice", "limit": 1})
    assert [r["id"] for r in both["rules"]] == more_mine[:1] and both["total"] == 3


async def test_pages_stay_stable_while_rules_are_pushed_and_removed(harness: Any) -> None:
    """Keyset paging: a rule present when the first page was read, and not removed,
    is returned exactly once, whatever is inserted or deleted between pages; new
    rules land after the pages already read (ids only grow)."""
    before = await _insert(harness, 40)
    got = await harness.call("rules.list", {"limit": 7})
    seen = [r["id"] for r in got["rules"]]
    cursor, added, removed = got["next_cursor"], [], []
    while cursor:
        added += await _insert(harness, 3)
        ahead = [i for i in before if i > seen[-1] and i not in removed]
        doomed = ahead[1] if len(ahead) > 1 else None  # a rule not read yet, not the next one
        if doomed is not None:
            async with harness.store.write() as db:
                await db.execute("DELETE FROM rules WHERE id = ?", (doomed,))
            removed.append(doomed)
        got = await harness.call("rules.list", {"limit": 7, "cursor": cursor})
        seen += [r["id"] for r in got["rules"]]
        cursor = got["next_cursor"]
    assert len(seen) == len(set(seen)) and seen == sorted(seen)
    assert set(before) - set(removed) <= set(seen)
    assert set(seen) <= set(before) | set(added)
    assert not set(removed) & set(seen)


def _flip(c: str) -> str:
    return c[:5] + ("A" if c[5] != "A" else "B") + c[6:]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c[:-2],
        _flip,
        lambda c: base64.urlsafe_b64encode(b"\x00" * 8 + b"[3]").decode(),
        lambda c: "not a cursor!",
        lambda c: encode_cursor("clients", ["01ARZ3NDEKTSV4RRFFQ69G5FAV"]),  # another list's
        lambda c: encode_cursor("rules", ["7"]),  # our list, but not an id
        lambda c: encode_cursor("rules", [-1]),
        lambda c: 12,
    ],
)
async def test_tampered_cursor_is_validation_cursor(harness: Any, mutate: Any) -> None:
    await _insert(harness, 3)
    cursor = (await harness.call("rules.list", {"limit": 1}))["next_cursor"]
    await expect_error(
        harness.call("rules.list", {"limit": 1, "cursor": mutate(cursor)}), "validation.cursor"
    )


async def test_bad_filters_are_validation_errors(harness: Any) -> None:
    await expect_error(harness.call("rules.list", {"state": "broken"}), "validation.state")
    await expect_error(harness.call("rules.list", {"protocol": "sctp"}), "validation.protocol")
    await expect_error(harness.call("rules.list", {"limit": 5000}), "validation.limit")
    await expect_error(harness.call("rules.list", {"limit": 0}), "validation.limit")
    # offset paging is gone: refused with a pointer to cursor, never silently ignored
    await expect_error(harness.call("rules.list", {"limit": 5, "offset": 5}), "validation.offset")
    await expect_error(harness.call("rules.list", {"clinet": "local"}), "validation.unknown_field")


FILTER_SETS = [
    {"client_id": "x"},
    {"owner": "alice"},
    {"state": "failed"},
    {"protocol": "udp"},
    {"client_id": "x", "protocol": "udp"},
    {"owner": "alice", "state": "active"},
    {"state": "failed", "protocol": "tcp"},
    {"client_id": "x", "owner": "alice", "state": "active", "protocol": "tcp"},
]


@pytest.mark.parametrize("filters", FILTER_SETS)
async def test_totals_and_pages_come_from_indexes(harness: Any, filters: dict[str, str]) -> None:
    """The count and the page of rules.list, as store.rules builds them, are index
    searches led by the most selective filter, never a scan of the rules table nor a
    sort (EXPLAIN QUERY PLAN)."""
    where, args = rules_db._filters(
        filters.get("client_id"),
        filters.get("owner"),
        filters.get("state"),
        filters.get("protocol"),
    )
    lead = {"client_id": "rules_by_client", "owner": "rules_by_owner", "state": "rules_by_state"}
    index = next((lead[k] for k in lead if k in filters), "rules_by_protocol")
    page = f"SELECT r.id FROM rules r {where} AND r.id > ? ORDER BY r.id LIMIT 101"
    count = f"SELECT COUNT(*) FROM rules r {where}"
    async with harness.store.read() as db:
        for sql, params in ((page, (*args, 5)), (count, args)):
            async with db.execute("EXPLAIN QUERY PLAN " + sql, params) as cur:
                plan = " | ".join(str(row[3]) for row in await cur.fetchall())
            assert plan.startswith("SEARCH") and "TEMP B-TREE" not in plan, (sql, plan)
            if sql is page:
                assert f"INDEX {index} (" in plan, (sql, plan)
