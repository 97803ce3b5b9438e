"""The user, token and grant verbs: help with examples, the request each sends,
passwords only from stdin, and the contract's exit codes."""

from __future__ import annotations

import re
from typing import Any

import pytest
from click.testing import CliRunner

from portunus.cli import grants as grants_cli
from portunus.cli import users as users_cli
from portunus.cli.server import cli
from portunus.errors import PortunusError


@pytest.mark.parametrize("verb", sorted(users_cli.VERBS | grants_cli.VERBS))
def test_every_verb_has_a_summary_and_an_example(verb: str) -> None:
    top = CliRunner().invoke(cli, ["--help"])
    assert re.search(rf"^  {re.escape(verb)}\s+(\S.*)$", top.stdout, re.M), top.stdout
    res = CliRunner().invoke(cli, [verb, "--help"])
    assert res.exit_code == 0 and "Example" in res.stdout and "--format [text|json]" in res.stdout


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    calls: list[tuple[str, dict[str, Any]]] = []
    answers: dict[str, Any] = {
        "users.add": {"user_id": "alice", "role": "user", "temporary_password": "tmp-secret-xyz"},
        "users.passwd": {
            "user_id": "alice",
            "password_change_required": False,
            "revoked_sessions": 2,
        },
        "grants.add": {
            "grant_id": 4,
            "user_id": "alice",
            "client": "edge",
            "listen_port_start": 10,
            "listen_port_end": 20,
            "protocols": ["tcp", "udp"],
        },
        "grants.revoke": PortunusError("grant_not_found", "no grant 9"),
        "users.remove": PortunusError("role_required", "users.remove needs the superadmin role"),
    }

    def fake(
        self: Any, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> Any:
        calls.append((method, params or {}))
        answer = answers.get(method, {})
        if isinstance(answer, PortunusError):
            raise answer
        return answer

    monkeypatch.setattr("portunus.cli.common.OperatorContext.call", fake)
    return calls


def test_user_add_reads_the_password_from_stdin_only(
    sent: list[tuple[str, dict[str, Any]]],
) -> None:
    res = CliRunner().invoke(
        cli,
        ["user-add", "alice", "--role", "superadmin", "--password-stdin"],
        input="a long secret password\n",
    )
    assert res.exit_code == 0, res.output
    assert sent == [
        (
            "users.add",
            {"user_id": "alice", "role": "superadmin", "password": "a long secret password"},
        )
    ]
    assert "a long secret password" not in res.output
    res = CliRunner().invoke(cli, ["user-add", "alice"])
    assert "tmp-secret-xyz" in res.stdout and sent[-1][1] == {"user_id": "alice", "role": "user"}
    res = CliRunner().invoke(cli, ["user-add", "alice", "--password-stdin"], input="\n")
    assert res.exit_code == 2 and "validation.password_too_short" in res.stderr


def test_grant_add_sends_ports_and_protocols(sent: list[tuple[str, dict[str, Any]]]) -> None:
    res = CliRunner().invoke(
        cli,
        [
            "grant-add",
            "alice",
            "--client",
            "edge",
            "--ports",
            "10-20",
            "--protocols",
            "tcp,udp",
            "--note",
            "team a",
        ],
    )
    assert res.exit_code == 0, res.output
    assert sent[-1] == (
        "grants.add",
        {
            "user_id": "alice",
            "client": "edge",
            "listen_port_start": 10,
            "listen_port_end": 20,
            "protocols": ["tcp", "udp"],
            "note": "team a",
        },
    )
    assert "grant 4: alice may use tcp,udp ports 10-20 on edge" in res.stdout
    res = CliRunner().invoke(cli, ["grant-add", "alice", "--client", "*", "--ports", "abc"])
    assert res.exit_code == 2 and "validation.port_range" in res.stderr


def test_exit_codes(sent: list[tuple[str, dict[str, Any]]]) -> None:
    res = CliRunner().invoke(cli, ["grant-revoke", "9"])
    assert res.exit_code == 5 and res.stderr.startswith("error: grant_not_found: ")
    res = CliRunner().invoke(cli, ["user-remove", "bob"])
    assert res.exit_code == 9 and "hint: this needs a superadmin's token" in res.stderr


def test_push_rule_owner(sent: list[tuple[str, dict[str, Any]]]) -> None:
    CliRunner().invoke(cli, ["push-rule", "local", "8080", "127.0.0.1:80", "--owner", "alice"])
    assert sent[-1][0] == "rules.push" and sent[-1][1]["owner"] == "alice"
