"""rules.list, users.list, grants.list and tokens.list paging end to end: the real
server, its CLI (--limit/--cursor/--all) and /v1 (?limit=&cursor= and filters), with
the shapes {<rows>, next_cursor, total} and validation.cursor for an edited cursor."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.support import ServerFactory, ServerProc


@pytest.fixture(scope="module")
def srv(server_module: ServerFactory) -> ServerProc:
    return server_module()


def _walk_http(srv: ServerProc, path: str, key: str, field: str) -> tuple[list[Any], int]:
    """Every page of ``path`` (which has a query string), following next_cursor."""
    status, page = srv.http("GET", path)
    assert status == 200, page
    rows, calls = [r[field] for r in page[key]], 1
    while page["next_cursor"]:
        status, page = srv.http("GET", f"{path}&cursor={page['next_cursor']}")
        assert status == 200, page
        assert set(page) == {key, "next_cursor", "total"}
        rows += [r[field] for r in page[key]]
        calls += 1
    return rows, calls


def _edited(cursor: str) -> str:
    return cursor[:-3] + ("AAA" if not cursor.endswith("AAA") else "BBB")


def test_rules_pages_and_filters(srv: ServerProc, ports) -> None:  # type: ignore[no-untyped-def]
    ids = []
    for i in range(7):
        body = {
            "client": "local",
            "listen_port": ports.port(),
            "protocol": "udp" if i % 3 == 0 else "tcp",
            "targets": [{"host": "127.0.0.1", "port": 9, "priority": 1}],
        }
        status, rule = srv.http("POST", "/v1/rules", body)
        assert status == 201, rule
        ids.append(rule["id"])

    status, first = srv.http("GET", "/v1/rules?limit=3")
    assert status == 200 and set(first) == {"rules", "next_cursor", "total"}
    assert [r["id"] for r in first["rules"]] == ids[:3] and first["total"] == 7
    walked, calls = _walk_http(srv, "/v1/rules?limit=3", "rules", "id")
    assert walked == ids and calls == 3
    udp, _ = _walk_http(srv, "/v1/rules?limit=1&protocol=udp&client=local", "rules", "id")
    assert udp == [ids[0], ids[3], ids[6]]
    status, active = srv.http("GET", "/v1/rules?state=active&limit=1")
    assert status == 200 and active["total"] == 7

    status, err = srv.http("GET", f"/v1/rules?cursor={_edited(first['next_cursor'])}")
    assert status == 400 and err["error"]["code"] == "validation.cursor", err
    status, err = srv.http("GET", "/v1/rules?limit=3&offset=3")
    assert status == 400 and err["error"]["code"] == "validation.offset", err
    status, err = srv.http("GET", "/v1/rules?limit=1001")
    assert status == 400, err

    # the CLI: one page and a hint on stderr, --cursor, --all (limit = page size)
    res = srv.cli("list-rules", "--limit", "2", "--protocol", "tcp")
    assert res.returncode == 0 and "2 of 4 shown" in res.stderr and "--cursor" in res.stderr, res
    every = srv.cli_json("list-rules", "--all", "--limit", "2")
    assert [r["id"] for r in every["rules"]] == ids and every["next_cursor"] is None
    page = srv.cli_json("list-rules", "--limit", "3", "--cursor", first["next_cursor"])
    assert [r["id"] for r in page["rules"]] == ids[3:6] and page["total"] == 7
    res = srv.cli("list-rules", "--cursor", _edited(first["next_cursor"]))
    assert res.returncode == 2 and "validation.cursor" in res.stderr, res


def test_users_grants_and_tokens_page(srv: ServerProc) -> None:
    names = [f"pager{i}" for i in range(5)]
    for name in names:
        srv.rpc("users.add", {"user_id": name, "password": "correct horse battery"})
        for lo in (20000, 21000):
            srv.rpc(
                "grants.add",
                {
                    "user_id": name,
                    "client": "*" if lo == 20000 else "local",
                    "listen_port_start": lo,
                    "listen_port_end": lo + 9,
                },
            )
        srv.rpc("tokens.issue", {"user_id": name, "name": "ci"})

    walked, calls = _walk_http(srv, "/v1/users?limit=2&name_prefix=pager", "users", "user_id")
    assert walked == names and calls == 3
    status, supers = srv.http("GET", "/v1/users?role=superadmin")
    assert status == 200 and "pager0" not in {u["user_id"] for u in supers["users"]}
    users = srv.cli_json("user-list", "--all", "--limit", "1", "--name-prefix", "pager")
    assert [u["user_id"] for u in users["users"]] == names and users["total"] == 5

    grants, _ = _walk_http(srv, "/v1/grants?limit=3&user=pager1", "grants", "grant_id")
    assert len(grants) == 2 and grants == sorted(grants)
    status, star = srv.http("GET", "/v1/grants?client=*&limit=2")
    assert status == 200 and star["total"] >= 5 and len(star["grants"]) == 2
    assert all(g["client"] == "*" for g in star["grants"])
    listed = srv.cli_json("grant-list", "--client", "local", "--all", "--limit", "2")
    assert {g["user_id"] for g in listed["grants"]} >= set(names)

    status, tokens = srv.http("GET", "/v1/users/pager2/tokens?limit=1")
    assert status == 200 and tokens["total"] == 1 and tokens["next_cursor"] is None
    every = srv.cli_json("token-list", "--all", "--limit", "2")
    ids = [t["token_id"] for t in every["tokens"]]
    assert ids == sorted(ids) and len(ids) == every["total"] >= 5

    status, err = srv.http("GET", "/v1/users?cursor=" + _edited(star["next_cursor"]))
    assert status == 400 and err["error"]["code"] == "validation.cursor", err
    status, err = srv.http("GET", "/v1/grants?cursor=" + star["next_cursor"] + "&user=pager1")
    assert status == 200  # the same list's cursor is good with other filters (they apply again)
    res = srv.cli("user-list", "--cursor", star["next_cursor"])  # a grants cursor
    assert res.returncode == 2 and "validation.cursor" in res.stderr, res
