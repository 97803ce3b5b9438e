"""clients.list paging and filters, clients.get (control.fleet.client_pages, store.paging)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from portunus.control.store import accounts

from ..conftest import expect_error


async def _add(edge: Any, names: list[str]) -> list[str]:
    async with edge.store.write() as db:
        return [(await accounts.insert_client(db, n)).client_id for n in names]


async def _walk(edge: Any, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Every page of clients.list; returns the rows and the number of calls."""
    rows: list[dict[str, Any]] = []
    cursor = None
    calls = 0
    while True:
        got = await edge.call("clients.list", {**params, **({"cursor": cursor} if cursor else {})})
        calls += 1
        rows += got["clients"]
        cursor = got["next_cursor"]
        if cursor is None:
            return rows, calls


async def test_default_page_is_100_local_first_then_enrollment_order(edge: Any) -> None:
    ids = await _add(edge, [f"c{i:03}" for i in range(150)])
    first = await edge.call("clients.list")
    assert len(first["clients"]) == 100 and first["total"] == 151
    assert first["clients"][0]["client_id"] == "local"
    rows, calls = await _walk(edge)
    assert calls == 2
    assert [r["client_id"] for r in rows] == ["local", *sorted(ids)]


async def test_limit_pages_and_last_page_has_no_cursor(edge: Any) -> None:
    await _add(edge, [f"c{i}" for i in range(9)])
    rows, calls = await _walk(edge, limit=3)
    assert len(rows) == 10 and calls == 4
    assert len({r["client_id"] for r in rows}) == 10
    exact = await edge.call("clients.list", {"limit": 10})
    assert len(exact["clients"]) == 10 and exact["next_cursor"] is None


async def test_pages_stay_stable_while_clients_are_enrolled(edge: Any) -> None:
    """Keyset paging: a row present at the first page is returned exactly once, whatever
    is inserted in between."""
    before = await _add(edge, [f"old{i}" for i in range(40)])
    got = await edge.call("clients.list", {"limit": 7})
    seen = [r["client_id"] for r in got["clients"]]
    cursor = got["next_cursor"]
    added: list[str] = []
    while cursor:
        added += await _add(edge, [f"new{len(added) + i}" for i in range(5)])
        got = await edge.call("clients.list", {"limit": 7, "cursor": cursor})
        seen += [r["client_id"] for r in got["clients"]]
        cursor = got["next_cursor"]
    assert len(seen) == len(set(seen))
    assert set(before) | {"local"} <= set(seen)
    assert set(seen) <= set(before) | set(added) | {"local"}
    assert seen == sorted(seen, key=lambda i: (i != "local", i))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c[:-2],
        lambda c: c[:5] + ("A" if c[5] != "A" else "B") + c[6:],
        lambda c: base64.urlsafe_b64encode(b"\x00" * 8 + b'["zzz"]').decode(),
        lambda c: "not a cursor!",
        lambda c: "12",
    ],
)
async def test_tampered_cursor_is_validation_cursor(edge: Any, mutate: Any) -> None:
    await _add(edge, ["a", "b", "c"])
    cursor = (await edge.call("clients.list", {"limit": 1}))["next_cursor"]
    err = await expect_error(
        edge.call("clients.list", {"limit": 1, "cursor": mutate(cursor)}), "validation.cursor"
    )
    assert err.exit_code == 2


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"limit": 0}, "validation.limit"),
        ({"limit": 1001}, "validation.limit"),
        ({"limit": True}, "validation.limit"),
        ({"connected": "yes"}, "validation.connected"),
        ({"name_prefix": ""}, "validation.name_prefix"),
        ({"name_prefix": "x" * 65}, "validation.name_prefix"),
        ({"colour": 1}, "validation.unknown_field"),
    ],
)
async def test_bad_list_params(edge: Any, params: dict[str, Any], code: str) -> None:
    await expect_error(edge.call("clients.list", params), code)


async def test_limit_1000_is_allowed(edge: Any) -> None:
    got = await edge.call("clients.list", {"limit": 1000})
    assert got["next_cursor"] is None and got["total"] == 1


async def test_name_prefix_filter_and_total(edge: Any) -> None:
    await _add(edge, ["edge-a", "edge-b", "edgy", "core-1", "edge_%", "Edge-c"])
    rows, _ = await _walk(edge, name_prefix="edge-", limit=1)
    assert sorted(r["client_name"] for r in rows) == ["edge-a", "edge-b"]
    got = await edge.call("clients.list", {"name_prefix": "edge"})
    assert got["total"] == 3 and len(got["clients"]) == 3  # not "edgy", not "Edge-c"
    assert (await edge.call("clients.list", {"name_prefix": "edge_"}))[
        "total"
    ] == 1  # no LIKE wildcards
    assert (await edge.call("clients.list", {"name_prefix": "loc"}))["clients"][0][
        "client_id"
    ] == "local"


async def test_connected_filter_walks_live_sessions(edge: Any) -> None:
    await _add(edge, [f"off{i}" for i in range(5)])
    live = []
    for i in range(3):
        _, enrolled = await edge.connect(f"on{i}")
        live.append(enrolled["client_id"])
    rows, calls = await _walk(edge, connected=True, limit=2)
    remote = [r["client_id"] for r in rows if r["client_id"] != "local"]
    assert remote == sorted(live) and all(r["connected"] for r in rows)
    got = await edge.call("clients.list", {"connected": True})
    assert got["total"] == len(rows)
    off, _ = await _walk(edge, connected=False, limit=2)
    assert not any(r["connected"] for r in off)
    assert {r["client_name"] for r in off} >= {f"off{i}" for i in range(5)}
    assert (await edge.call("clients.list", {"connected": False}))["total"] == len(off)
    assert len(off) + len(rows) == (await edge.call("clients.list"))["total"]
    pref = await edge.call("clients.list", {"connected": True, "name_prefix": "on1"})
    assert [r["client_id"] for r in pref["clients"]] == [live[1]] and pref["total"] == 1


async def test_get_one_by_id_or_name(edge: Any) -> None:
    _, enrolled = await edge.connect("solo")
    by_name = await edge.call("clients.get", {"id": "solo"})
    by_id = await edge.call("clients.get", {"id": enrolled["client_id"]})
    assert by_name == by_id
    assert (
        by_id["connected"] is True and by_id["client_name"] == "solo" and by_id["rule_count"] == 0
    )
    await expect_error(edge.call("clients.get", {"id": "nope"}), "client_not_found")
    await _add(edge, ["twin", "twin"])
    await expect_error(edge.call("clients.get", {"id": "twin"}), "ambiguous_client")
    await expect_error(edge.call("clients.get", {}), "validation.id")
