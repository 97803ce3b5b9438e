"""Token resolution order, socket resolution, and error code → exit code + hint."""

from __future__ import annotations

import os
from typing import Any

import pytest

from portunus.cli import common
from portunus.errors import PortunusError


def _write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture
def tokens(control, tmp_path) -> dict[str, str]:
    """A token in every place; each test removes the higher-priority ones."""
    return {
        "file": _write(str(tmp_path / "given.token"), "from-token-file\n"),
        "datadir": _write(os.path.join(control.data_dir, "operator.token"), "  from-data-dir\n"),
        "etc": _write(common.SYSTEM_TOKEN_FILE, "from-etc\n"),
    }


def _sent_token(control, run, *args: str, env: dict[str, Any]) -> str:
    control.reply("rules.list", {"rules": []})
    res = run(*args, "list-rules", env=env)
    assert res.exit_code == 0, res.stderr
    return control.last["token"]


def test_env_token_wins(control, run, tokens) -> None:
    env = {"PORTUNUS_OPERATOR_TOKEN": "from-env"}
    assert _sent_token(control, run, "--token-file", tokens["file"], env=env) == "from-env"


def test_token_file_option_then_env_var(control, run, tokens) -> None:
    env = {"PORTUNUS_OPERATOR_TOKEN": None}
    assert _sent_token(control, run, "--token-file", tokens["file"], env=env) == "from-token-file"
    env["PORTUNUS_TOKEN_FILE"] = tokens["file"]
    assert _sent_token(control, run, env=env) == "from-token-file"


def test_data_dir_token_then_etc(control, run, tokens) -> None:
    env = {"PORTUNUS_OPERATOR_TOKEN": None}
    assert _sent_token(control, run, env=env) == "from-data-dir"
    os.unlink(tokens["datadir"])
    assert _sent_token(control, run, env=env) == "from-etc"


def test_no_token_exits_4_and_names_the_three_ways(control, run) -> None:
    res = run("list-rules", env={"PORTUNUS_OPERATOR_TOKEN": None})
    assert res.exit_code == 4
    err = res.stderr.splitlines()
    assert err[0].startswith("error: unauthenticated: no operator token")
    assert err[1].startswith("hint: ")
    for way in (
        "PORTUNUS_OPERATOR_TOKEN",
        "--token-file",
        os.path.join(control.data_dir, "operator.token"),
    ):
        assert way in err[1]
    assert control.requests == []


def test_unreadable_token_file_is_not_skipped(control, run, tokens, tmp_path) -> None:
    res = run(
        "--token-file",
        str(tmp_path / "missing"),
        "list-rules",
        env={"PORTUNUS_OPERATOR_TOKEN": None},
    )
    assert res.exit_code == 4
    assert "missing" in res.stderr
    assert control.requests == []


def test_empty_token_file_exits_4(control, run, tmp_path) -> None:
    path = _write(str(tmp_path / "empty"), "\n")
    res = run("--token-file", path, "list-rules", env={"PORTUNUS_OPERATOR_TOKEN": None})
    assert res.exit_code == 4
    assert "empty" in res.stderr


def test_refused_token_hint_names_its_source(control, run, tokens) -> None:
    control.reply("rules.list", PortunusError("unauthenticated", "unknown token"))
    res = run("--token-file", tokens["file"], "list-rules", env={"PORTUNUS_OPERATOR_TOKEN": None})
    assert res.exit_code == 4
    assert res.stderr.splitlines()[0] == "error: unauthenticated: unknown token"
    assert tokens["file"] in res.stderr.splitlines()[1]


def test_default_socket_is_in_runtime_dir(control, run, monkeypatch, tmp_path) -> None:
    control.reply("rules.list", {"rules": []})
    assert run("list-rules").exit_code == 0  # found <data-dir>/run/control.sock by itself
    ctx = common.OperatorContext(data_dir=str(tmp_path))
    monkeypatch.setenv("PORTUNUS_RUNTIME_DIR", "/somewhere/run")
    assert ctx.socket_path == "/somewhere/run/control.sock"
    assert (
        common.OperatorContext(data_dir="/var/lib/portunus", socket="/x.sock").socket_path
        == "/x.sock"
    )


def test_socket_option_and_env(control, run, tmp_path) -> None:
    control.reply("rules.list", {"rules": []})
    other = str(tmp_path / "elsewhere")
    assert run("--socket", control.path, "list-rules", data_dir=other).exit_code == 0
    assert run("list-rules", data_dir=other, env={"PORTUNUS_SOCKET": control.path}).exit_code == 0


def test_unavailable_socket_exit_1_with_hint(run, tmp_path) -> None:
    res = run("--socket", str(tmp_path / "none.sock"), "list-rules")
    assert res.exit_code == 1
    lines = res.stderr.splitlines()
    assert lines[0].startswith("error: unavailable: ")
    assert lines[1].startswith("hint: ") and "serve" in lines[1] and "--socket" in lines[1]


# Expected exit codes written out from docs/reference/exit-codes.md, not read from errors.py.
CODES = [
    ("validation.port", 2),
    ("validation.sni_on_unsupported_rule", 2),
    ("bad_request", 2),
    ("preflight", 3),
    ("unauthenticated", 4),
    ("not_found", 5),
    ("rule_not_found", 5),
    ("client_not_found", 5),
    ("activation_failed", 6),
    ("ack_timeout", 7),
    ("client_not_connected", 8),
    ("forbidden", 9),
    ("client_not_granted", 9),
    ("port_outside_grant", 9),
    ("protocol_not_granted", 9),
    ("conflict", 10),
    ("port_conflict", 10),
    ("ambiguous_client", 10),
    ("conflict.legacy_to_sni_unsupported", 10),
    ("sni_unsupported_by_client", 1),
    ("throttled", 1),
    ("unavailable", 1),
    ("internal", 1),
]


@pytest.mark.parametrize(("code", "exit_code"), CODES)
def test_error_code_to_exit_code(control, run, code, exit_code) -> None:
    control.reply("rules.push", PortunusError(code, f"canned {code}"))
    res = run("push-rule", "edge-01", "8080", "h:80")
    assert res.exit_code == exit_code
    assert res.stderr.splitlines()[0] == f"error: {code}: canned {code}"
    assert res.stdout == ""


@pytest.mark.parametrize(
    ("code", "details", "needle"),
    [
        ("client_not_connected", {}, "portunus-server list-clients"),
        ("client_not_found", {}, "portunus-server list-clients"),
        ("port_conflict", {}, "`portunus-server list-rules --client edge-01`"),
        (
            "activation_failed",
            {"rule": {"id": 41}},
            "kept as failed; remove it with `portunus-server remove-rule 41`",
        ),
        ("ack_timeout", {"rule": {"id": 42}}, "rule 42 is pending"),
        ("conflict.legacy_to_sni_unsupported", {}, "remove the existing rule"),
        ("forbidden", {}, "grant"),
    ],
)
def test_hints(control, run, code, details, needle) -> None:
    control.reply("rules.push", PortunusError(code, "x", **details))
    res = run("push-rule", "edge-01", "8080", "h:80")
    hint = res.stderr.splitlines()[1]
    assert hint.startswith("hint: ")
    assert needle in hint


def test_no_hint_when_nothing_useful(control, run) -> None:
    control.reply("rules.push", PortunusError("internal", "boom"))
    res = run("push-rule", "edge-01", "8080", "h:80")
    assert res.stderr == "error: internal: boom\n"


def test_garbage_reply_is_an_error_not_a_traceback(control, run, monkeypatch) -> None:
    def bad(*_a: Any, **_k: Any) -> Any:
        raise ValueError("Expecting value: line 1 column 1 (char 0)")

    monkeypatch.setattr(common, "call_sync", bad)
    res = run("list-rules")
    assert res.exit_code == 1
    assert res.stderr.startswith("error: internal: unreadable reply")
