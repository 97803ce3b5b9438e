"""``owner-cap set|get|list|delete``: what is sent, what is printed, exit codes."""

from __future__ import annotations

import json

from click.testing import CliRunner

from portunus.cli.server import cli
from portunus.errors import PortunusError

CAP = {
    "client_id": "local",
    "client": "local",
    "owner": "alice",
    "rate_limit": {"bandwidth_in_bps": 1250000, "concurrent_connections": 50},
    "updated_at": "2026-12-05T10:00:00.000Z",
}


def test_set_sends_the_caps_and_prints_them(control, run) -> None:
    control.reply("owner_caps.set", CAP)
    res = run(
        "owner-cap",
        "set",
        "local",
        "alice",
        "--bandwidth-in-bps",
        "1250000",
        "--concurrent-connections",
        "50",
        "--bandwidth-in-bps-burst",
        "100000",
    )
    assert res.exit_code == 0, res.stderr
    assert control.last["method"] == "owner_caps.set"
    assert control.last["params"] == {
        "client": "local",
        "owner": "alice",
        "rate_limit": {
            "bandwidth_in_bps": 1250000,
            "concurrent_connections": 50,
            "bandwidth_in_bps_burst": 100000,
        },
    }
    assert (
        res.stdout
        == "owner alice on client local: bandwidth_in_bps=1250000 concurrent_connections=50\n"
    )


def test_set_without_caps_is_a_preflight_refusal(control, run) -> None:
    res = run("owner-cap", "set", "local", "alice")
    assert res.exit_code == 3
    assert res.stderr.startswith("error: preflight: no caps given")
    assert control.requests == []  # refused before anything was sent


def test_set_with_a_bad_value_is_a_usage_error(control, run) -> None:
    res = run("owner-cap", "set", "local", "alice", "--bandwidth-in-bps", "0")
    assert res.exit_code == 2
    assert control.requests == []


def test_get_list_delete_json_and_text(control, run) -> None:
    control.reply("owner_caps.get", CAP)
    res = run("owner-cap", "get", "edge-01", "alice", "--format", "json")
    assert res.exit_code == 0 and json.loads(res.stdout) == CAP
    assert control.last["params"] == {"client": "edge-01", "owner": "alice"}
    text = run("owner-cap", "get", "local", "alice")
    assert ["bandwidth_in_bps", "1250000"] in [line.split() for line in text.stdout.splitlines()]

    listing = {
        "client_id": "local",
        "client": "local",
        "owners": [
            {
                "owner": "alice",
                "rule_count": 2,
                "rate_limit": CAP["rate_limit"],
                "updated_at": CAP["updated_at"],
            },
            {"owner": "bob", "rule_count": 1, "rate_limit": None, "updated_at": None},
        ],
    }
    control.reply("owner_caps.list", listing)
    res = run("owner-cap", "list", "local")
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["OWNER", "RULES", "CAPS"]
    assert lines[1].split() == [
        "alice",
        "2",
        "bandwidth_in_bps=1250000",
        "concurrent_connections=50",
    ]
    assert lines[2].split() == ["bob", "1", "-"]
    assert json.loads(run("owner-cap", "list", "local", "--format", "json").stdout) == listing

    control.reply("owner_caps.delete", {})
    res = run("owner-cap", "delete", "local", "alice")
    assert res.exit_code == 0 and control.last["method"] == "owner_caps.delete"


def test_server_errors_map_to_exit_codes(control, run) -> None:
    control.reply("owner_caps.get", PortunusError("owner_cap_not_found", "owner alice has no cap"))
    assert run("owner-cap", "get", "local", "alice").exit_code == 5
    control.reply("owner_caps.set", PortunusError("rate_limit_unsupported_by_client", "no"))
    assert run("owner-cap", "set", "e", "alice", "--concurrent-connections", "1").exit_code == 1
    control.reply("owner_caps.list", PortunusError("client_not_found", "no client"))
    assert run("owner-cap", "list", "nope").exit_code == 5
    control.reply("owner_caps.delete", PortunusError("validation.owner", "bad owner"))
    assert run("owner-cap", "delete", "local", "Bad").exit_code == 2


def test_the_group_is_listed_with_examples() -> None:
    top = CliRunner().invoke(cli, ["--help"])
    assert "owner-cap" in top.stdout
    res = CliRunner().invoke(cli, ["owner-cap", "--help"])
    assert res.exit_code == 0 and "Example" in res.stdout
    for verb in ("set", "get", "list", "delete"):
        sub = CliRunner().invoke(cli, ["owner-cap", verb, "--help"])
        assert sub.exit_code == 0 and "--format [text|json]" in sub.stdout
