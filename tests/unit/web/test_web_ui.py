"""Web UI pages over ASGI against a fake control socket: each page calls the same
RPC as the API, forms give the API's codes, CSRF, security headers, role gates,
static assets."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from portunus.control.policy import POLICY
from portunus.errors import PortunusError
from portunus.web.ui.render import ASSET_VERSION

from .fakes import AUTH, RULE, STATS, TOKEN, FakeControl, client_by_ref, paged_clients

POST = {
    **AUTH,
    "X-Portunus-CSRF": "1",
    "Origin": "http://api",
    "Content-Type": "application/x-www-form-urlencoded",
}
CLIENTS = [
    {
        "client_id": "local",
        "client_name": "local",
        "connected": True,
        "remote_addr": None,
        "connected_since": None,
        "version": None,
        "capabilities": [],
        "rule_count": 1,
    },
    {
        "client_id": "01EDGE",
        "client_name": "edge-1",
        "connected": False,
        "remote_addr": None,
        "connected_since": None,
        "version": None,
        "capabilities": [],
        "rule_count": 0,
    },
]
TRAFFIC = {
    "resolution": "minute",
    "from": 0,
    "to": 120,
    "series": [
        {"ts": 0, "bytes_in": 600, "bytes_out": 60, "connections": 1},
        {"ts": 60, "bytes_in": 0, "bytes_out": 0, "connections": 0},
    ],
}
SUMMARY = {
    "bytes_in_per_sec": 10.0,
    "bytes_out_per_sec": 1.0,
    "since": 0,
    "per_rule": {"7": {"bytes_in_per_sec": 10.0, "bytes_out_per_sec": 1.0}},
    "top_rules": [{"rule": 7, "bytes_in": 600, "bytes_out": 60}],
}


def _listed(rules: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """rules.list as control answers it: filtered by state, one page, with the total."""
    shown = [r for r in rules if params.get("state") in (None, r["state"])]
    return {"rules": shown[: params.get("limit", 100)], "next_cursor": None, "total": len(shown)}


def me(user: str, role: str, change: bool = False) -> dict[str, Any]:
    return {
        "user_id": user,
        "display_name": user.title(),
        "role": role,
        "password_change_required": change,
    }


@pytest.fixture(autouse=True)
def every_rpc_has_a_policy(fake: FakeControl) -> Iterator[None]:
    """Pages decide nothing: each RPC they send is one control authorizes."""
    yield
    assert {q["method"] for q in fake.requests} <= set(POLICY)


@pytest.fixture(autouse=True)
def replies(fake: FakeControl) -> None:
    failed = {
        **RULE,
        "id": 8,
        "state": "failed",
        "failure_reason": "port_in_use (port 8081 already bound)",
    }
    fake.replies.update(
        {
            "users.me": me("operator", "superadmin"),
            "clients.list": paged_clients(CLIENTS),
            "clients.get": client_by_ref(CLIENTS),
            "rules.list": lambda params: _listed([RULE, failed], params),
            "rules.counts": {
                "by_state": {"active": 1, "pending": 0, "failed": 1, "draining": 0},
                "total": 2,
            },
            "rules.get": RULE,
            "rules.stats": {
                **STATS,
                "per_port": [
                    {
                        "port": 8080,
                        **{
                            k: 1
                            for k in (
                                "bytes_in",
                                "bytes_out",
                                "connections_total",
                                "active_connections",
                            )
                        },
                    }
                ],
                "per_target": [
                    {
                        "target": "127.0.0.1:9090",
                        "priority": 1,
                        "up": True,
                        "connections_total": 3,
                        "connect_failures_total": 0,
                    }
                ],
            },
            "traffic.query": TRAFFIC,
            "traffic.summary": SUMMARY,
        }
    )


def _form(**fields: str) -> str:
    from urllib.parse import urlencode

    return urlencode(fields)


async def test_dashboard_shows_counts_alerts_and_top_rules(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    r = await api.get("/", headers=AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "2 failed rule" not in r.text and "1 failed rule" in r.text
    assert "port_in_use (port 8081 already bound)" in r.text
    assert "1 client offline" in r.text and "edge-1" in r.text
    assert 'href="/rules/7"' in r.text
    # every RPC carried the caller's token
    assert {req["token"] for req in fake.requests} == {TOKEN}
    assert {"clients.list", "rules.list", "traffic.summary", "traffic.query"} <= {
        q["method"] for q in fake.requests
    }


async def test_security_headers_on_pages_and_api(api: httpx.AsyncClient) -> None:
    for path in ("/", "/v1/health"):
        r = await api.get(path, headers=AUTH)
        csp = r.headers["content-security-policy"]
        assert (
            "script-src 'self'" in csp
            and "unsafe-inline" not in csp
            and "frame-ancestors 'none'" in csp
        )
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "same-origin"


async def test_pages_have_no_inline_script_or_style(api: httpx.AsyncClient) -> None:
    for path in ("/", "/rules", "/rules/7", "/rules/new", "/clients", "/clients/enroll"):
        text = (await api.get(path, headers=AUTH)).text
        assert "<script>" not in text and "<script " not in text.replace(
            f'<script src="/static/{ASSET_VERSION}/', ""
        )
        assert " style=" not in text and "<style" not in text, path
        assert TOKEN not in text


async def test_unauthenticated_page_redirects_to_login(api: httpx.AsyncClient) -> None:
    r = await api.get("/rules?state=failed")
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=/rules"


async def test_rules_list_filters_in_the_query_string(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    r = await api.get("/rules?client=local&state=failed", headers=AUTH)
    assert r.status_code == 200
    assert fake.calls("rules.list")[-1]["params"] == {
        "client": "local",
        "state": "failed",
        "limit": 50,
    }
    assert 'href="/rules/8"' in r.text and 'href="/rules/7"' not in r.text
    assert "Next page" not in r.text and "First page" not in r.text


async def test_rules_list_follows_next_cursor_with_the_filters(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["rules.list"] = {"rules": [RULE], "next_cursor": "c+2/", "total": 120}
    r = await api.get("/rules?state=active", headers=AUTH)
    assert r.status_code == 200 and "120 rules" in r.text
    link = re.search(r'<a href="([^"]+)">Next page →</a>', r.text)
    assert link is not None and "First page" not in r.text
    assert html.unescape(link.group(1)) == "/rules?state=active&cursor=c%2B2/"
    fake.replies["rules.list"] = {"rules": [RULE], "next_cursor": None, "total": 120}
    r = await api.get(html.unescape(link.group(1)), headers=AUTH)
    assert r.status_code == 200
    assert fake.calls("rules.list")[-1]["params"] == {
        "state": "active",
        "limit": 50,
        "cursor": "c+2/",
    }
    assert "Next page" not in r.text and 'href="/rules?state=active">← First page' in r.text


async def test_push_form_sends_the_api_body(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["rules.push"] = RULE
    body = _form(
        client="local",
        protocol="tcp",
        listen="30000-30009",
        **{
            "targets[0].host": "10.0.0.5",
            "targets[0].port": "9000-9009",
            "targets[0].priority": "1",
            "targets[1].host": "10.0.0.6",
            "targets[1].port": "9000-9009",
            "targets[1].priority": "2",
            "proxy_protocol": "v2",
            "rate_limit.bandwidth_in_bps": "1000000",
        },
    )
    r = await api.post("/rules/new", content=body, headers=POST)
    assert r.status_code == 303 and r.headers["location"] == "/rules/7?notice=pushed"
    assert fake.calls("rules.push")[0]["params"] == {
        "client": "local",
        "protocol": "tcp",
        "listen_port_start": 30000,
        "listen_port_end": 30009,
        "targets": [
            {"host": "10.0.0.5", "port_start": 9000, "port_end": 9009, "priority": 1},
            {"host": "10.0.0.6", "port_start": 9000, "port_end": 9009, "priority": 2},
        ],
        "proxy_protocol": "v2",
        "rate_limit": {"bandwidth_in_bps": 1000000},
    }


async def test_push_form_shows_the_api_validation_code(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    body = _form(
        client="local", listen="70000", **{"targets[0].host": "10.0.0.5", "targets[0].port": "80"}
    )
    r = await api.post("/rules/new", content=body, headers=POST)
    api_answer = await api.post(
        "/v1/rules",
        json={
            "client": "local",
            "listen_port": 70000,
            "targets": [{"host": "10.0.0.5", "port": 80}],
        },
        headers=AUTH,
    )
    assert r.status_code == api_answer.status_code == 400
    err = api_answer.json()["error"]
    assert err["code"] == "validation.port"
    assert err["code"] in r.text and err["message"] in r.text
    assert 'id="f-listen"' in r.text and 'aria-invalid="true"' in r.text
    assert not fake.calls("rules.push")


async def test_push_form_shows_control_errors(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["rules.push"] = PortunusError(
        "port_conflict", "port 8080/tcp is taken by rule 3", rule=3
    )
    body = _form(client="local", listen="8080", **{"targets[0].host": "h", "targets[0].port": "80"})
    r = await api.post("/rules/new", content=body, headers=POST)
    assert r.status_code == 409
    assert "port_conflict" in r.text and "port 8080/tcp is taken by rule 3" in r.text
    assert 'value="8080"' in r.text  # the form keeps what was typed


async def test_form_post_without_csrf_header_is_refused(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["rules.remove"] = {}
    headers = {k: v for k, v in POST.items() if k != "X-Portunus-CSRF"}
    r = await api.post("/rules/7/remove", content="", headers=headers)
    assert r.status_code == 403 and "csrf_failed" in r.text
    r = await api.post(
        "/rules/7/remove", content="", headers={**POST, "Origin": "http://evil.example"}
    )
    assert r.status_code == 403 and "csrf_failed" in r.text
    assert not fake.calls("rules.remove")
    r = await api.post("/rules/7/remove", content="", headers=POST)
    assert r.status_code == 303 and r.headers["location"] == "/rules?notice=removed-7"
    assert fake.calls("rules.remove")[0]["params"] == {"id": 7}


async def test_caps_form_updates_rate_limit(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["rules.update"] = RULE
    r = await api.post(
        "/rules/7/caps", content=_form(**{"rate_limit.concurrent_connections": "5"}), headers=POST
    )
    assert r.status_code == 303
    assert fake.calls("rules.update")[0]["params"] == {
        "id": 7,
        "rate_limit": {"concurrent_connections": 5},
    }
    r = await api.post(
        "/rules/7/caps", content=_form(**{"rate_limit.concurrent_connections": "0"}), headers=POST
    )
    assert r.status_code == 400 and "validation.rate_limit" in r.text
    r = await api.post("/rules/7/caps", content=_form(), headers=POST)  # all empty: uncapped
    assert fake.calls("rules.update")[-1]["params"] == {"id": 7, "rate_limit": None}


async def test_rule_detail_has_live_stream_and_tables(api: httpx.AsyncClient) -> None:
    r = await api.get("/rules/7", headers=AUTH)
    assert r.status_code == 200
    assert 'data-live="/v1/rules/7/stats/stream?interval=1"' in r.text
    assert "127.0.0.1:9090" in r.text and "Edit caps" in r.text
    assert (await api.get("/rules/abc", headers=AUTH)).status_code == 404


async def test_enroll_shows_the_command_once_with_copy_button(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["clients.enroll"] = {
        "client_id": "01NEW",
        "client_name": "edge-2",
        "expires_at": "2026-12-05T15:00:00.000Z",
        "uri": "portunus://127.0.0.1:7443/enroll?code=SECRET&fp=sha256:" + "a" * 64,
        "command": "portunus-client enroll 'portunus://127.0.0.1:7443/enroll?code=SECRET&fp=sha256:"
        + "a" * 64
        + "'",
    }
    r = await api.post(
        "/clients/enroll", content=_form(name="edge-2", ttl_secs="600"), headers=POST
    )
    assert r.status_code == 201
    assert "portunus-client enroll" in r.text and 'data-copy="enroll-command"' in r.text
    assert r.headers["cache-control"] == "no-store"
    assert fake.calls("clients.enroll")[0]["params"] == {"name": "edge-2", "ttl_secs": 600}
    r = await api.post("/clients/enroll", content=_form(name="", ttl_secs="0"), headers=POST)
    assert r.status_code == 400 and "validation." in r.text


async def test_user_sees_no_admin_navigation_and_gets_the_permission_page(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["users.me"] = me("alice", "user")
    r = await api.get("/", headers=AUTH)
    assert r.status_code == 200 and 'href="/audit"' not in r.text and "Administration" not in r.text
    for path in ("/audit", "/clients/enroll", "/metrics-summary", "/audit/export"):
        r = await api.get(path, headers=AUTH)
        assert r.status_code == 403, path
        assert "Not permitted" in r.text and "role_required" in r.text
    assert not fake.calls("audit.list")


async def test_audit_page_and_exports(api: httpx.AsyncClient, fake: FakeControl) -> None:
    entries = [
        {
            "id": i,
            "ts": f"2026-12-05T10:00:0{i}.000Z",
            "actor": "operator",
            "action": "rules.push",
            "target": f"rule:{i}",
            "outcome": "ok",
            "error_code": None,
            "details": {"a": i},
        }
        for i in (3, 2, 1)
    ]
    pages = iter(
        [
            {"entries": entries[:2], "next_cursor": "2"},
            {"entries": entries[2:], "next_cursor": None},
        ]
    )
    fake.replies["audit.list"] = lambda params: next(pages)
    r = await api.get("/audit/export?format=ndjson&actor=operator&outcome=ok", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line)["id"] for line in r.text.splitlines()] == [3, 2, 1]
    calls = fake.calls("audit.list")
    assert calls[0]["params"] == {"actor": "operator", "outcome": "ok", "limit": 1000}
    assert calls[1]["params"]["cursor"] == "2"
    fake.replies["audit.list"] = {"entries": entries, "next_cursor": None}
    csv_text = (await api.get("/audit/export?format=csv", headers=AUTH)).text.splitlines()
    assert csv_text[0] == "id,ts,actor,action,target,outcome,error_code,details"
    assert csv_text[1].startswith("3,2026-12-05T10:00:03.000Z,operator,rules.push,rule:3,ok,,")
    page = await api.get("/audit?since=1h&outcome=error", headers=AUTH)
    assert page.status_code == 200 and "rules.push" in page.text
    assert fake.calls("audit.list")[-1]["params"] == {
        "since": "1h",
        "outcome": "error",
        "limit": 50,
    }


async def test_static_assets_are_versioned_and_cached(api: httpx.AsyncClient) -> None:
    r = await api.get(f"/static/{ASSET_VERSION}/app.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    again = await api.get(
        f"/static/{ASSET_VERSION}/app.js", headers={"If-None-Match": r.headers["etag"]}
    )
    assert again.status_code == 304
    assert (await api.get("/static/0.0.0-old/app.js")).status_code == 404
    assert (await api.get(f"/static/{ASSET_VERSION}/../app.py")).status_code == 404


async def test_every_input_has_a_label(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["audit.list"] = {"entries": [], "next_cursor": None}
    for path in (
        "/rules",
        "/rules/new",
        "/rules/7",
        "/clients",
        "/clients/enroll",
        "/clients/01EDGE",
        "/audit",
    ):
        r = await api.get(path, headers=AUTH)
        assert r.status_code == 200, path
        text = r.text
        ids = re.findall(r'<(?:input|select|textarea)[^>]*\bid="([^"]+)"', text)
        inputs = re.findall(r"<(?:input|select|textarea)\b[^>]*>", text)
        assert len(ids) == len([i for i in inputs if 'type="hidden"' not in i]), path
        for ident in ids:
            assert f'for="{ident}"' in text, (path, ident)


async def test_traffic_route_forwards_the_query(api: httpx.AsyncClient, fake: FakeControl) -> None:
    r = await api.get("/v1/traffic?rule=7&from=1h&resolution=minute", headers=AUTH)
    assert r.status_code == 200 and r.json() == TRAFFIC
    assert fake.calls("traffic.query")[0]["params"] == {
        "rule": "7",
        "from": "1h",
        "resolution": "minute",
    }
    assert (await api.get("/v1/traffic")).status_code == 401
    r = await api.get("/v1/traffic/summary?limit=5", headers=AUTH)
    assert r.status_code == 200 and fake.calls("traffic.summary")[0]["params"] == {"limit": 5}


async def test_unknown_page_is_an_html_page_for_browsers(api: httpx.AsyncClient) -> None:
    r = await api.get("/no-such-page", headers={"Accept": "text/html,application/xhtml+xml"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "not_found" in r.text
    r = await api.get("/v1/no-such-route", headers={"Accept": "text/html"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_assets_and_templates_ship_as_package_data() -> None:
    """The wheel (and so the .deb and .rpm, built from it) carries every asset and template."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["portunus"]
    web = root / "portunus"
    files = [
        p.relative_to(web).as_posix()
        for sub in ("web/static", "web/templates")
        for p in (web / sub).rglob("*")
        if p.is_file()
    ]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files
    assert all("/" not in f.split("/", 2)[2] for f in files)  # flat: the globs are one level deep
