"""The Web UI with a large fleet: the clients page pages by cursor with its filters in
the query string, the dashboard counts from ``total``, a client's page is one
``clients.get``, and client pickers turn into a text input past one page."""

from __future__ import annotations

import html
import re
from typing import Any

import httpx
import pytest

from portunus.control.policy import POLICY

from .fakes import AUTH, RULE, FakeControl, client_by_ref, paged_clients


def _client(i: int, connected: bool) -> dict[str, Any]:
    return {
        "client_id": f"01E{i:05d}",
        "client_name": f"edge-{i:05d}",
        "connected": connected,
        "remote_addr": None,
        "connected_since": None,
        "version": None,
        "capabilities": [],
        "rule_count": i % 3,
    }


LOCAL = {**_client(0, True), "client_id": "local", "client_name": "local"}
# 1,500 edge clients, every third one offline: more than one picker page (1,000)
FLEET = [LOCAL] + [_client(i, i % 3 != 0) for i in range(1, 1501)]
OFFLINE = sum(1 for c in FLEET if not c["connected"])


@pytest.fixture(autouse=True)
def replies(fake: FakeControl) -> None:
    fake.replies.update(
        {
            "users.me": {"user_id": "operator", "role": "superadmin"},
            "clients.list": paged_clients(FLEET),
            "clients.get": client_by_ref(FLEET),
            "rules.list": {"rules": [RULE], "next_cursor": None, "total": 1},
            "rules.counts": {"by_state": {"active": 1}, "total": 1},
            "traffic.summary": {
                "bytes_in_per_sec": 0,
                "bytes_out_per_sec": 0,
                "per_rule": {},
                "top_rules": [],
            },
            "traffic.query": {"resolution": "minute", "from": 0, "to": 60, "series": []},
            "grants.list": {"grants": []},
            "users.get": {"user_id": "bob", "role": "user"},
            "tokens.list": {"tokens": []},
            "owner_caps.list": {"client": "local", "owners": []},
        }
    )


@pytest.fixture(autouse=True)
def every_rpc_has_a_policy(fake: FakeControl) -> Any:
    yield
    assert {q["method"] for q in fake.requests} <= set(POLICY)


def _next_link(text: str) -> str | None:
    found = re.search(r'<a href="([^"]+)">Next page →</a>', text)
    return html.unescape(found.group(1)) if found else None


async def test_clients_page_is_one_page_with_total_and_next_link(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    r = await api.get("/clients", headers=AUTH)
    assert r.status_code == 200
    assert fake.calls("clients.list")[-1]["params"] == {"limit": 100}
    assert "1501 clients" in r.text
    assert r.text.count('<a href="/clients/01E') == 99 and ">local</a>" in r.text
    link = _next_link(r.text)
    assert link == "/clients?cursor=cur-01E00099"
    # following it reads the next page with the cursor passed through untouched
    r = await api.get(link, headers=AUTH)
    assert fake.calls("clients.list")[-1]["params"] == {"limit": 100, "cursor": "cur-01E00099"}
    assert "edge-00100" in r.text and "edge-00099" not in r.text
    assert '<a href="/clients">← First page</a>' in r.text


async def test_clients_filters_stay_in_the_query_string(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    r = await api.get("/clients?connected=false&name_prefix=edge-00", headers=AUTH)
    assert fake.calls("clients.list")[-1]["params"] == {
        "connected": False,
        "name_prefix": "edge-00",
        "limit": 100,
    }
    matching = sum(1 for c in FLEET if not c["connected"] and c["client_name"] < "edge-01")
    assert f"{matching} clients match the filters" in r.text
    assert '<option value="false" selected>offline</option>' in r.text
    assert 'value="edge-00"' in r.text and "edge-00001" not in r.text  # 1 is connected
    link = _next_link(r.text)
    assert link is not None and link.startswith("/clients?connected=false&name_prefix=edge-00&")
    await api.get(link, headers=AUTH)
    params = fake.calls("clients.list")[-1]["params"]
    assert params["connected"] is False and params["name_prefix"] == "edge-00"
    assert params["cursor"].startswith("cur-")
    # the last page has no next link; an unknown state value is not a filter
    r = await api.get("/clients?connected=maybe&name_prefix=local", headers=AUTH)
    assert fake.calls("clients.list")[-1]["params"] == {"name_prefix": "local", "limit": 100}
    assert _next_link(r.text) is None and "1 client matches the filters" in r.text


async def test_clients_page_bounds_the_cursor(api: httpx.AsyncClient, fake: FakeControl) -> None:
    await api.get("/clients?cursor=" + "A" * 257, headers=AUTH)
    assert "cursor" not in fake.calls("clients.list")[-1]["params"]
    r = await api.get("/clients?cursor=forged", headers=AUTH)
    assert r.status_code == 400 and "validation.cursor" in r.text


async def test_dashboard_counts_from_total(api: httpx.AsyncClient, fake: FakeControl) -> None:
    r = await api.get("/", headers=AUTH)
    assert r.status_code == 200
    calls = [q["params"] for q in fake.calls("clients.list")]
    assert all(p.get("limit", 1000) <= 11 for p in calls) and len(calls) == 3
    edge = len(FLEET) - 1
    up = edge - OFFLINE
    assert f"{up} / {edge}" in r.text
    assert f"{OFFLINE} clients offline" in r.text
    shown = re.findall(r'<li><a href="/clients/(01E\d+)">', r.text)
    assert len(shown) == 10 and "local" not in shown
    assert f"and {OFFLINE - 10} more" in r.text and 'href="/clients?connected=false"' in r.text


async def test_dashboard_offline_count_excludes_an_offline_local(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fleet = [{**LOCAL, "connected": False}, _client(1, False), _client(2, True)]
    fake.replies["clients.list"] = paged_clients(fleet)
    r = await api.get("/", headers=AUTH)
    assert "1 / 2" in r.text and "1 client offline" in r.text and "more</a>" not in r.text


async def test_client_page_is_one_clients_get(api: httpx.AsyncClient, fake: FakeControl) -> None:
    r = await api.get("/clients/edge-01200", headers=AUTH)
    assert r.status_code == 200 and "01E01200" in r.text
    assert fake.calls("clients.get")[-1]["params"] == {"id": "edge-01200"}
    assert not fake.calls("clients.list")
    r = await api.get("/clients/nope", headers=AUTH)
    assert r.status_code == 404 and "client_not_found" in r.text


def _picker(text: str, field_id: str) -> str:
    found = re.search(rf'<(input|select) id="{field_id}"', text)
    assert found, field_id
    return found.group(1)


@pytest.mark.parametrize(
    ("path", "field_id"),
    [
        ("/rules", "q-client"),
        ("/rules/new", "f-client"),
        ("/users/bob", "f-client"),
        ("/owner-caps", "q-client"),
    ],
)
async def test_client_picker_is_a_text_input_past_one_page(
    api: httpx.AsyncClient, fake: FakeControl, path: str, field_id: str
) -> None:
    r = await api.get(path, headers=AUTH)
    assert r.status_code == 200, path
    assert fake.calls("clients.list")[-1]["params"] == {"limit": 1000}
    assert _picker(r.text, field_id) == "input"
    assert f'list="{field_id}-names"' in r.text and f'<datalist id="{field_id}-names">' in r.text
    assert r.text.count('<option value="edge-') == 999  # local + 999 edge clients
    assert re.search(rf'<label for="{field_id}">', r.text)
    # a fleet of one page keeps the select
    fake.replies["clients.list"] = paged_clients(FLEET[:5])
    r = await api.get(path, headers=AUTH)
    assert _picker(r.text, field_id) == "select" and "<datalist" not in r.text


async def test_typed_picker_keeps_the_value(api: httpx.AsyncClient) -> None:
    r = await api.get("/rules?client=edge-01400", headers=AUTH)
    assert re.search(r'<input id="q-client" name="client" value="edge-01400"', r.text)
    r = await api.get("/rules/new?client=01E00002", headers=AUTH)
    assert re.search(r'<input id="f-client" name="client" value="01E00002"', r.text)


async def test_select_picker_selects_by_name_or_id(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["clients.list"] = paged_clients(FLEET[:5])
    r = await api.get("/rules/new?client=01E00002", headers=AUTH)
    assert '<option value="edge-00002" selected>edge-00002</option>' in r.text
    assert '<option value="edge-00003">edge-00003 (offline)</option>' in r.text
    r = await api.get("/users/bob", headers=AUTH)
    assert '<option value="*">* (every client)</option>' in r.text
