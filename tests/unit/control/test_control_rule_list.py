"""rules.list filters and paging, and rules.counts: applied by control (in SQL), so
the Web UI never reads thousands of rules to show fifty."""

from __future__ import annotations

from typing import Any

from .conftest import expect_error


async def _push(harness: Any, port: int, protocol: str = "tcp") -> int:
    rule = await harness.call(
        "rules.push",
        {"listen_port": port, "protocol": protocol, "targets": [{"host": "127.0.0.1", "port": 9}]},
    )
    return int(rule["id"])


async def test_paging_and_filters(harness: Any) -> None:
    ids = [await _push(harness, 31000 + i, "udp" if i % 3 == 0 else "tcp") for i in range(7)]
    page = await harness.call("rules.list", {"limit": 3, "offset": 2})
    assert [r["id"] for r in page["rules"]] == ids[2:5] and page["total"] == 7
    udp = await harness.call("rules.list", {"protocol": "udp", "limit": 10})
    assert [r["id"] for r in udp["rules"]] == [ids[0], ids[3], ids[6]] and udp["total"] == 3
    assert (await harness.call("rules.list", {"state": "failed", "limit": 5})) == {
        "rules": [],
        "total": 0,
    }
    assert "total" not in await harness.call("rules.list")  # the contract's shape without a limit
    counts = await harness.call("rules.counts")
    assert counts == {
        "by_state": {"pending": 0, "active": 7, "failed": 0, "draining": 0, "revoked": 0},
        "total": 7,
    }


async def test_bad_filters_are_validation_errors(harness: Any) -> None:
    await expect_error(harness.call("rules.list", {"state": "broken"}), "validation.state")
    await expect_error(harness.call("rules.list", {"protocol": "sctp"}), "validation.protocol")
    await expect_error(harness.call("rules.list", {"limit": 5000}), "validation.limit")
    await expect_error(harness.call("rules.list", {"limit": 5, "offset": -1}), "validation.offset")
