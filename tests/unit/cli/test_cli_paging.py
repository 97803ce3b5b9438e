"""--limit/--cursor/--all of list-rules, user-list, grant-list and token-list: the
same semantics as list-clients (cli/paging.py) against a fake control socket."""

from __future__ import annotations

import json
from typing import Any

import pytest

VERBS = [
    # verb, method, key, the id field of a row, filter flags, the params they send
    (
        "list-rules",
        "rules.list",
        "rules",
        "id",
        ["--client", "edge-01", "--owner", "alice", "--state", "failed", "--protocol", "udp"],
        {"client": "edge-01", "owner": "alice", "state": "failed", "protocol": "udp"},
    ),
    (
        "user-list",
        "users.list",
        "users",
        "user_id",
        ["--role", "user", "--name-prefix", "al"],
        {"role": "user", "name_prefix": "al"},
    ),
    (
        "grant-list",
        "grants.list",
        "grants",
        "grant_id",
        ["--user", "alice", "--client", "*"],
        {"user_id": "alice", "client": "*"},
    ),
    ("token-list", "tokens.list", "tokens", "token_id", ["--user", "bob"], {"user_id": "bob"}),
]


def _pages(key: str, field: str) -> Any:
    """Three pages of one row each, keyed by an opaque cursor like the server's."""
    pages = {None: (1, "p2"), "p2": (2, "p3"), "p3": (3, None)}

    def reply(params: dict[str, Any]) -> dict[str, Any]:
        n, nxt = pages[params.get("cursor")]
        row = {field: n if field != "user_id" else f"u{n}"}
        if key == "rules":
            row.update(client="local", protocol="tcp", listen_port=n, targets=[], state="active")
        return {key: [row], "next_cursor": nxt, "total": 3}

    return reply


@pytest.mark.parametrize(("verb", "method", "key", "field", "flags", "sent"), VERBS)
def test_one_page_hint_cursor_and_all(
    control, run, verb: str, method: str, key: str, field: str, flags: list[str], sent: dict
) -> None:
    control.reply(method, _pages(key, field))
    res = run(verb, "--limit", "1", *flags)
    assert res.exit_code == 0, res.stderr
    assert control.last["params"] == {**sent, "limit": 1}
    assert "--cursor p2" in res.stderr and "1 of 3 shown" in res.stderr
    res = run(verb, "--limit", "1", "--cursor", "p3", "--format", "json")
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    assert len(got[key]) == 1 and got["next_cursor"] is None and got["total"] == 3
    assert control.last["params"] == {"limit": 1, "cursor": "p3"}
    res = run(verb, "--all", "--limit", "1", *flags, "--format", "json")
    got = json.loads(res.stdout)
    assert len(got[key]) == 3 and got["next_cursor"] is None
    assert [r["params"] for r in control.requests[-3:]] == [
        {**sent, "limit": 1},
        {**sent, "limit": 1, "cursor": "p2"},
        {**sent, "limit": 1, "cursor": "p3"},
    ]
    res = run(verb, "--all")
    assert res.exit_code == 0 and "more" not in res.stderr  # every page: no hint
    assert run(verb, "--limit", "1001").exit_code == 2
    assert run(verb, "--limit", "0").exit_code == 2


def test_cursor_refused_by_control_exits_2(control, run) -> None:
    from portunus.errors import ValidationError

    control.reply("rules.list", ValidationError("validation.cursor", "cursor is not a next_cursor"))
    res = run("list-rules", "--cursor", "edited")
    assert res.exit_code == 2 and "validation.cursor" in res.stderr
