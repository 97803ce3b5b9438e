"""list-rules, rule-stats, remove-rule, list-clients, audit, gen-token,
bootstrap-superadmin and the verb set / help texts."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from portunus.cli.server import cli
from portunus.errors import PortunusError

RULES = [
    {
        "id": 1,
        "client": "local",
        "protocol": "tcp",
        "listen_port": 18080,
        "targets": [{"host": "127.0.0.1", "port": 8080, "priority": 1}],
        "sni_pattern": None,
        "proxy_protocol": None,
        "rate_limit": None,
        "owner": "",
        "state": "active",
        "failure_reason": None,
    },
    {
        "id": 12,
        "client": "edge-01",
        "protocol": "udp",
        "listen_port_start": 30000,
        "listen_port_end": 30050,
        "targets": [
            {"host": "upstream.local", "port_start": 30000, "port_end": 30050, "priority": 1}
        ],
        "sni_pattern": None,
        "proxy_protocol": None,
        "rate_limit": {"bandwidth_in_bps": 1000},
        "owner": "alice",
        "state": "failed",
        "failure_reason": "port_in_use (port 30005 already bound)",
    },
    {
        "id": 103,
        "client": "e2",
        "protocol": "tcp",
        "listen_port": 443,
        "targets": [
            {"host": "a", "port": 8443, "priority": 1},
            {"host": "b", "port": 8443, "priority": 2},
        ],
        "sni_pattern": "api.example.com",
        "proxy_protocol": "v2",
        "rate_limit": None,
        "owner": "",
        "state": "pending",
        "failure_reason": None,
    },
]


def _columns(header: str) -> list[int]:
    return [m.start() for m in re.finditer(r"\S+", header)]


def test_list_rules_table_is_aligned(control, run) -> None:
    control.reply("rules.list", {"rules": RULES})
    res = run("list-rules")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["ID", "CLIENT", "PROTO", "LISTEN", "TARGETS", "STATE", "INFO"]
    starts = _columns(lines[0])
    expected = [
        ["1", "local", "tcp", "18080", "127.0.0.1:8080", "active", ""],
        [
            "12",
            "edge-01",
            "udp",
            "30000-30050",
            "upstream.local:30000-30050",
            "failed",
            "bw_in=1000 owner=alice reason=port_in_use (port 30005 already bound)",
        ],
        ["103", "e2", "tcp", "443", "a:8443@1,b:8443@2", "pending", "sni=api.example.com proxy=v2"],
    ]
    assert len(lines) == 1 + len(expected)
    for line, cells in zip(lines[1:], expected, strict=True):
        assert line == line.rstrip()
        for start, cell in zip(starts, cells, strict=True):
            if not cell:  # an empty last column leaves no trailing blanks
                assert len(line) < start
                continue
            assert line[start:].startswith(cell), (line, start, cell)
            if start:
                assert line[start - 1] == " "


def test_list_rules_filters_and_json_shape(control, run) -> None:
    control.reply("rules.list", {"rules": RULES[:1]})
    res = run("list-rules", "--client", "edge-01", "--owner", "alice", "--format", "json")
    assert res.exit_code == 0
    assert control.last["method"] == "rules.list"
    assert control.last["params"] == {"client": "edge-01", "owner": "alice"}
    assert json.loads(res.stdout) == {"rules": RULES[:1]}


def test_list_rules_empty_says_so(control, run) -> None:
    control.reply("rules.list", {"rules": []})
    res = run("list-rules")
    assert control.last["params"] == {}
    assert res.stdout == "no rules\n"


STATS = {
    "id": 7,
    "bytes_in": 1234567,
    "bytes_out": 512,
    "connections_total": 12,
    "active_connections": 3,
    "per_port": [
        {
            "port": 30000,
            "bytes_in": 2048,
            "bytes_out": 0,
            "connections_total": 1,
            "active_connections": 0,
        },
        {
            "port": 30001,
            "bytes_in": 5,
            "bytes_out": 5,
            "connections_total": 2,
            "active_connections": 1,
        },
    ],
}


def test_rule_stats_text_uses_byte_units(control, run) -> None:
    control.reply("rules.stats", STATS)
    res = run("rule-stats", "7", "--per-port")
    assert res.exit_code == 0, res.stderr
    assert control.last["params"] == {"id": 7, "per_port": True}
    out = res.stdout
    assert "bytes in            1.2 MiB (1234567)" in out
    assert "bytes out           512 B" in out
    assert "active connections  3" in out
    lines = out.splitlines()
    i = lines.index("per port:")
    assert lines[i + 1].split() == [
        "PORT",
        "BYTES_IN",
        "BYTES_OUT",
        "CONNECTIONS_TOTAL",
        "ACTIVE_CONNECTIONS",
    ]
    assert lines[i + 2].startswith("30000  2.0 KiB (2048)")


def test_rule_stats_json_and_per_target(control, run) -> None:
    body = {
        "id": 7,
        "bytes_in": 1,
        "bytes_out": 2,
        "connections_total": 3,
        "active_connections": 0,
        "per_target": [{"target": "a:80", "bytes_in": 1, "bytes_out": 2}],
    }
    control.reply("rules.stats", body)
    res = run("rule-stats", "7", "--per-target", "--format", "json")
    assert control.last["params"] == {"id": 7, "per_target": True}
    assert json.loads(res.stdout) == body


def test_rule_stats_needs_a_numeric_id(control, run) -> None:
    res = run("rule-stats", "seven")
    assert res.exit_code == 2
    assert control.requests == []


def test_rule_not_found_exit_5_with_hint(control, run) -> None:
    control.reply("rules.stats", PortunusError("rule_not_found", "no rule 99"))
    res = run("rule-stats", "99")
    assert res.exit_code == 5
    assert (
        res.stderr
        == "error: rule_not_found: no rule 99\nhint: `portunus-server list-rules` shows the rule ids\n"
    )


def test_remove_rule(control, run) -> None:
    control.reply("rules.remove", {})
    res = run("remove-rule", "7")
    assert res.exit_code == 0
    assert control.last["method"] == "rules.remove"
    assert control.last["params"] == {"id": 7}
    assert "rule 7 removed" in res.stdout
    res = run("remove-rule", "7", "--format", "json")
    assert json.loads(res.stdout) == {}


CLIENTS = {
    "clients": [
        {
            "client_id": "c-1",
            "client_name": "local",
            "connected": True,
            "remote_addr": None,
            "connected_since": "2024-05-01T12:00:00Z",
            "version": "0.1.0",
            "capabilities": ["sni", "udp"],
            "rule_count": 2,
        },
        {
            "client_id": "c-22",
            "client_name": "edge-01",
            "connected": False,
            "remote_addr": "127.0.0.2:5000",
            "connected_since": None,
            "version": None,
            "capabilities": [],
            "rule_count": 0,
        },
    ]
}


def test_list_clients(control, run) -> None:
    control.reply("clients.list", CLIENTS)
    res = run("list-clients")
    assert res.exit_code == 0
    assert control.last["method"] == "clients.list"
    lines = res.stdout.splitlines()
    starts = _columns(lines[0])
    state_col = starts[2]
    assert lines[1][state_col:].startswith("connected")
    assert lines[2][state_col:].startswith("offline")
    assert "sni,udp" in lines[1]
    res = run("list-clients", "--format", "json")
    assert json.loads(res.stdout) == CLIENTS


def _paged_clients(params: dict) -> dict:
    """Three pages of one client each, keyed by an opaque cursor like the server's."""
    pages = {None: ("a", "p2"), "p2": ("b", "p3"), "p3": ("c", None)}
    name, nxt = pages[params.get("cursor")]
    row = {**CLIENTS["clients"][1], "client_id": f"id-{name}", "client_name": name}
    return {"clients": [row], "next_cursor": nxt, "total": 3}


def test_list_clients_pages(control, run) -> None:
    control.reply("clients.list", _paged_clients)
    res = run("list-clients", "--limit", "1", "--connected", "--name-prefix", "e")
    assert res.exit_code == 0
    assert control.last["params"] == {"limit": 1, "connected": True, "name_prefix": "e"}
    assert "--cursor p2" in res.stderr and "1 of 3 shown" in res.stderr
    res = run("list-clients", "--limit", "1", "--cursor", "p3", "--format", "json")
    assert [c["client_name"] for c in json.loads(res.stdout)["clients"]] == ["c"]
    assert control.last["params"] == {"limit": 1, "cursor": "p3"}
    res = run("list-clients", "--all", "--limit", "1", "--disconnected", "--format", "json")
    got = json.loads(res.stdout)
    assert [c["client_name"] for c in got["clients"]] == ["a", "b", "c"] and got[
        "next_cursor"
    ] is None
    assert [r["params"] for r in control.requests[-3:]] == [
        {"connected": False, "limit": 1},
        {"connected": False, "limit": 1, "cursor": "p2"},
        {"connected": False, "limit": 1, "cursor": "p3"},
    ]
    assert run("list-clients", "--limit", "1001").exit_code == 2


AUDIT = {
    "entries": [
        {
            "id": 2,
            "ts": "2024-05-01T12:00:01Z",
            "actor": "alice",
            "action": "rule.push",
            "target": "rule:7",
            "outcome": "error",
            "error_code": "port_conflict",
        },
        {
            "id": 1,
            "ts": "2024-05-01T12:00:00Z",
            "actor": "cli:bootstrap-superadmin",
            "action": "user.bootstrap",
            "target": "user:alice",
            "outcome": "ok",
            "error_code": None,
        },
    ],
    "next_cursor": "abc",
}


def test_audit_relative_since_and_limit(control, run) -> None:
    control.reply("audit.list", AUDIT)
    before = datetime.now(UTC)
    res = run("audit", "--since", "1h", "--limit", "5")
    assert res.exit_code == 0, res.stderr
    params = control.last["params"]
    assert set(params) == {"since", "limit"} and params["limit"] == 5
    since = datetime.strptime(params["since"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert 3595 <= (before - since).total_seconds() <= 3605
    assert res.stdout.splitlines()[0].split() == [
        "ID",
        "TIME",
        "ACTOR",
        "ACTION",
        "TARGET",
        "OUTCOME",
        "ERROR",
    ]
    assert "port_conflict" in res.stdout
    assert "more entries" in res.stderr


def test_audit_absolute_times_become_utc(control, run) -> None:
    control.reply("audit.list", {"entries": [], "next_cursor": None})
    res = run(
        "audit", "--since", "2024-05-01T12:00:00+02:00", "--until", "2024-05-02", "--format", "json"
    )
    assert res.exit_code == 0
    assert control.last["params"] == {
        "since": "2024-05-01T10:00:00Z",
        "until": "2024-05-02T00:00:00Z",
    }
    assert json.loads(res.stdout) == {"entries": [], "next_cursor": None}


@pytest.mark.parametrize(
    "args", [["--since", "yesterday-ish"], ["--limit", "0"], ["--limit", "1001"]]
)
def test_audit_bad_arguments_exit_2(control, run, args) -> None:
    res = run("audit", *args)
    assert res.exit_code == 2
    assert control.requests == []


def test_gen_token() -> None:
    runner = CliRunner()
    a = runner.invoke(cli, ["gen-token"])
    b = runner.invoke(cli, ["gen-token", "--format", "json"])
    assert a.exit_code == 0 and b.exit_code == 0
    token = a.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert json.loads(b.stdout)["token"] != token


def test_bootstrap_superadmin_prints_only_the_token_and_refuses_a_duplicate(tmp_path) -> None:
    # Uses the control helper's real portunus.control.store.bootstrap_superadmin
    # on a fresh state.db; no server runs.
    runner = CliRunner()
    data_dir = str(tmp_path / "var")
    first = runner.invoke(cli, ["--data-dir", data_dir, "bootstrap-superadmin", "--name", "alice"])
    assert first.exit_code == 0, first.output
    assert re.fullmatch(r"[A-Za-z0-9_-]{20,}\n", first.stdout)
    assert os.path.exists(os.path.join(data_dir, "state.db"))
    again = runner.invoke(cli, ["--data-dir", data_dir, "bootstrap-superadmin", "--name", "alice"])
    assert again.exit_code == 10
    assert again.stdout == ""
    assert again.stderr.startswith("error: conflict: ")
    other = runner.invoke(
        cli, ["--data-dir", data_dir, "bootstrap-superadmin", "--name", "bob", "--format", "json"]
    )
    body = json.loads(other.stdout)
    assert (
        body["name"] == "bob"
        and body["role"] == "superadmin"
        and body["token"] != first.stdout.strip()
    )


def test_bootstrap_superadmin_bad_name_exit_2(tmp_path) -> None:
    res = CliRunner().invoke(
        cli, ["--data-dir", str(tmp_path), "bootstrap-superadmin", "--name", "a b/c"]
    )
    assert res.exit_code == 2
    assert res.stderr.startswith("error: validation.")


MY_VERBS = [
    "gen-token",
    "bootstrap-superadmin",
    "push-rule",
    "list-rules",
    "rule-stats",
    "remove-rule",
    "list-clients",
    "audit",
]


@pytest.mark.parametrize("verb", MY_VERBS)
def test_every_verb_has_a_summary_and_an_example(verb) -> None:
    top = CliRunner().invoke(cli, ["--help"])
    summary = re.search(rf"^  {re.escape(verb)}\s+(\S.*)$", top.stdout, re.M)
    assert summary, top.stdout
    res = CliRunner().invoke(cli, [verb, "--help"])
    assert res.exit_code == 0
    assert "Example" in res.stdout
    assert re.search(rf"portunus-server .*{re.escape(verb)}", res.stdout.split("Example", 1)[1])
    assert "--format [text|json]" in res.stdout


def test_version() -> None:
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0
    assert res.stdout.startswith("portunus-server, version ")


def test_lazy_verb_missing_module_is_simply_absent(monkeypatch) -> None:
    from portunus.cli import server

    monkeypatch.setattr(server, "LAZY_VERBS", {"nope": "portunus.cli.no_such_module"})
    res = CliRunner().invoke(cli, ["nope"])
    assert res.exit_code == 2
    assert "nope" not in CliRunner().invoke(cli, ["--help"]).stdout


@pytest.mark.skipif(
    importlib.util.find_spec("portunus.cli.serve") is None, reason="serve not written yet"
)
def test_serve_is_found_lazily() -> None:
    assert "serve" in CliRunner().invoke(cli, ["--help"]).stdout
    assert CliRunner().invoke(cli, ["serve", "--help"]).exit_code == 0
