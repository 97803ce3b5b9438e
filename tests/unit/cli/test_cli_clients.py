"""enroll-client, revoke, rename-client, delete-client against a fake control socket."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from portunus.cli.server import cli
from portunus.errors import PortunusError

URI = "portunus://127.0.0.1:7443/enroll?code=abc_DEF-123&fp=sha256:" + "ab" * 32
ENROLLED = {
    "client_id": "01HZX3V6Q8K2M4N5P7R9S1T3W5",
    "client_name": "edge-01",
    "expires_at": "2026-01-01T00:10:00.000Z",
    "uri": URI,
    "command": f"portunus-client enroll '{URI}'",
}
CLIENT = {
    "client_id": "01HZX3V6Q8K2M4N5P7R9S1T3W5",
    "client_name": "edge-paris",
    "connected": True,
    "remote_addr": "127.0.0.1:50000",
    "connected_since": "2026-01-01T00:00:00.000Z",
    "version": "0.1.0",
    "capabilities": ["tcp"],
    "rule_count": 1,
}


def test_enroll_client_prints_exactly_the_command(control, run) -> None:
    control.reply("clients.enroll", ENROLLED)
    res = run("enroll-client", "edge-01", "--address", "127.0.0.1")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"portunus-client enroll '{URI}'\n"
    assert control.last["method"] == "clients.enroll"
    assert control.last["params"] == {"name": "edge-01", "address": "127.0.0.1", "ttl_secs": 600}
    res = run("enroll-client", "edge-01", "--ttl-secs", "60", "--format", "json")
    assert json.loads(res.stdout) == ENROLLED
    assert control.last["params"] == {"name": "edge-01", "ttl_secs": 60}


def test_enroll_client_usage_and_validation_errors(control, run) -> None:
    res = run("enroll-client", "edge-01", "--ttl-secs", "0")
    assert res.exit_code == 2 and control.requests == []
    control.reply(
        "clients.enroll", PortunusError("validation.name", "`local` is reserved", field="name")
    )
    res = run("enroll-client", "local")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: validation.name: `local` is reserved\n")


def test_revoke(control, run) -> None:
    control.reply(
        "clients.revoke",
        {
            **CLIENT,
            "connected": False,
            "revoked_at": "2026-01-01T00:01:00.000Z",
            "disconnected": True,
        },
    )
    res = run("revoke", "edge-paris")
    assert res.exit_code == 0
    assert control.last["params"] == {"id": "edge-paris"}
    assert (
        res.stdout
        == "client edge-paris (01HZX3V6Q8K2M4N5P7R9S1T3W5) revoked; its session was closed\n"
    )
    res = run("revoke", "edge-paris", "--format", "json")
    assert json.loads(res.stdout)["revoked_at"] == "2026-01-01T00:01:00.000Z"
    control.reply(
        "clients.revoke", PortunusError("client_not_found", "no client named or with id 'x'")
    )
    res = run("revoke", "x")
    assert res.exit_code == 5
    assert "list-clients" in res.stderr


def test_rename_client(control, run) -> None:
    control.reply("clients.rename", CLIENT)
    res = run("rename-client", CLIENT["client_id"], "--name", "edge-paris")
    assert res.exit_code == 0
    assert control.last["params"] == {"id": CLIENT["client_id"], "name": "edge-paris"}
    assert res.stdout == f"client {CLIENT['client_id']} renamed to edge-paris\n"
    assert json.loads(run("rename-client", "a", "--name", "b", "--format", "json").stdout) == CLIENT
    assert run("rename-client", "a").exit_code == 2  # --name is required


def test_delete_client_needs_revoke_first(control, run) -> None:
    control.reply(
        "clients.delete", PortunusError("conflict", "client edge is not revoked; revoke it first")
    )
    res = run("delete-client", "edge")
    assert res.exit_code == 10
    control.reply("clients.delete", {})
    res = run("delete-client", "edge")
    assert res.exit_code == 0 and "deleted" in res.stdout
    assert control.last["params"] == {"id": "edge"}


def test_offline_push_exit_code_is_8(control, run) -> None:
    control.reply(
        "rules.push", PortunusError("client_not_connected", "client edge is not connected")
    )
    res = run("push-rule", "edge", "19090", "127.0.0.1:9090")
    assert res.exit_code == 8


@pytest.mark.parametrize("verb", ["enroll-client", "revoke", "rename-client", "delete-client"])
def test_client_verbs_have_a_summary_and_an_example(verb: str) -> None:
    top = CliRunner().invoke(cli, ["--help"])
    assert re.search(rf"^  {re.escape(verb)}\s+\S", top.stdout, re.M), top.stdout
    res = CliRunner().invoke(cli, [verb, "--help"])
    assert res.exit_code == 0
    assert re.search(rf"portunus-server {re.escape(verb)} ", res.stdout.split("Example", 1)[1])
    assert "--format [text|json]" in res.stdout
