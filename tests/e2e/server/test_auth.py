"""Tokens against a running server: no token or a wrong one is refused on every
path (CLI exit 4, HTTP 401, RPC ``unauthenticated``) and changes nothing;
``bootstrap-superadmin`` mints a working token while the server runs; tokens are
stored hashed and never written to any log line, even at ``log_level = "debug"``."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import pytest

from portunus.errors import PortunusError
from tests.e2e.support import (
    ServerFactory,
    ServerProc,
    connection_refused,
    echo,
    echo_roundtrip,
)

# Tokens sent by these tests that must never be accepted nor logged.
BAD_TOKEN = "bad-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def srv(server_module: ServerFactory) -> ServerProc:
    return server_module(shards=1, settings={"log_level": "debug"})


def body(port: int, target_port: int = 9) -> dict[str, object]:
    return {
        "client": "local",
        "listen_port": port,
        "targets": [{"host": "127.0.0.1", "port": target_port}],
    }


def test_cli_without_a_token_exits_4(srv: ServerProc, tmp_path: Path, ports) -> None:  # type: ignore[no-untyped-def]
    """No env token, no --token-file, no readable default file (an empty data dir)."""
    empty = tmp_path / "no-token-here"
    empty.mkdir()
    port = ports.port()
    res = srv.cli(
        "--socket", srv.socket_path, "push-rule", "local", str(port), "127.0.0.1:9", data_dir=empty
    )
    assert res.returncode == 4, (res.returncode, res.stderr)
    assert res.stderr.startswith("error: unauthenticated: "), res.stderr
    assert "PORTUNUS_OPERATOR_TOKEN" in res.stderr, "the hint names the ways to give a token"
    res = srv.cli("--socket", srv.socket_path, "list-rules", data_dir=empty)
    assert res.returncode == 4, (res.returncode, res.stderr)
    assert connection_refused(port)


def test_cli_with_a_bad_token_exits_4(srv: ServerProc, tmp_path: Path, ports) -> None:  # type: ignore[no-untyped-def]
    port = ports.port()
    before = srv.rules()
    res = srv.cli("push-rule", "local", str(port), "127.0.0.1:9", token=BAD_TOKEN)
    assert res.returncode == 4, (res.returncode, res.stderr)
    assert res.stderr.startswith("error: unauthenticated: "), res.stderr
    assert "PORTUNUS_OPERATOR_TOKEN" in res.stderr, "the hint says which token was refused"
    bad_file = tmp_path / "bad.token"
    bad_file.write_text(BAD_TOKEN + "\n")
    res = srv.cli("--token-file", str(bad_file), "list-rules")
    assert res.returncode == 4, (res.returncode, res.stderr)
    missing = srv.cli("--token-file", str(tmp_path / "nope.token"), "list-rules")
    assert missing.returncode == 4, (missing.returncode, missing.stderr)
    # The env token wins over a good default token file (D/operator.token exists).
    res = srv.cli("remove-rule", "1", token=BAD_TOKEN)
    assert res.returncode == 4, res.stderr
    assert srv.rules() == before
    assert connection_refused(port)


@pytest.mark.parametrize(
    "auth", [None, f"Bearer {BAD_TOKEN}", "Bearer ", "Basic b3BzOm9wcw==", BAD_TOKEN]
)
def test_http_without_a_valid_token_is_401(srv: ServerProc, auth: str | None, ports) -> None:  # type: ignore[no-untyped-def]
    port = ports.port()
    headers = {"Authorization": auth} if auth is not None else {}
    calls = [
        ("GET", "/v1/rules", None),
        ("POST", "/v1/rules", body(port)),
        ("GET", "/v1/rules/1", None),
        ("DELETE", "/v1/rules/1", None),
        ("GET", "/v1/rules/1/stats", None),
        ("GET", "/v1/clients", None),
        ("GET", "/v1/audit", None),
    ]
    for method, path, payload in calls:
        resp = srv.http(method, path, payload, token=None, headers=headers)
        assert resp.status == 401, (method, path, resp)
        assert resp.error_code == "unauthenticated", (method, path, resp)
        assert resp.headers.get("www-authenticate", "").lower().startswith("bearer"), resp.headers
    assert connection_refused(port)
    # Health and the API description need no token.
    assert srv.http("GET", "/v1/health", token=None).json() == {"status": "ok"}
    assert srv.http("GET", "/v1/openapi.json", token=None).status == 200


def test_rpc_without_a_valid_token_is_refused(srv: ServerProc, ports) -> None:  # type: ignore[no-untyped-def]
    port = ports.port()
    for token in (None, BAD_TOKEN, ""):
        for method, params in (("rules.list", {}), ("rules.push", body(port)), ("auth.whoami", {})):
            with pytest.raises(PortunusError) as err:
                srv.rpc(method, params, token=token)
            assert err.value.code == "unauthenticated", (token, method, err.value)
    assert srv.rpc("health", token=None) == {"status": "ok"}
    assert connection_refused(port)


def test_bootstrap_superadmin_while_serving(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    res = srv.cli("bootstrap-superadmin", "--name", "ops")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1, f"only the token goes to stdout: {res.stdout!r}"
    token = lines[0]
    assert len(token) >= 32 and token != srv.token
    (srv.workdir / "minted.token").write_text(token)  # for the log check below

    assert srv.rpc("auth.whoami", token=token)["user"] == "ops"
    assert srv.rpc("auth.whoami", token=token)["role"] == "superadmin"
    org = origin(echo)
    port = ports.port()
    rule = srv.cli_json("push-rule", "local", str(port), org.address, token=token)
    assert rule["state"] == "active"
    assert echo_roundtrip(port)
    listed = srv.http("GET", "/v1/rules", token=token)
    assert listed.status == 200 and rule["id"] in [r["id"] for r in listed.json()["rules"]]
    assert srv.http("DELETE", f"/v1/rules/{rule['id']}", token=token).status == 204

    again = srv.cli("bootstrap-superadmin", "--name", "ops")
    assert again.returncode == 10, (again.returncode, again.stderr)
    assert "conflict" in again.stderr and again.stdout == ""
    assert srv.rpc("auth.whoami", token=token)["user"] == "ops", (
        "a refused re-bootstrap keeps the token"
    )


def test_tokens_are_stored_hashed(srv: ServerProc) -> None:
    """Neither the operator token nor a minted one is anywhere in the database files."""
    tokens = [srv.token]
    minted = srv.workdir / "minted.token"
    if minted.exists():
        tokens.append(minted.read_text().strip())
    # Push the WAL into the main file too, so both places are looked at.
    with sqlite3.connect(srv.db_path) as db:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    files = [p for p in srv.data_dir.iterdir() if p.name.startswith("state.db")]
    assert files
    for path in files:
        data = path.read_bytes()
        for tok in tokens:
            assert tok.encode() not in data, f"a plaintext token is stored in {path.name}"


def test_no_token_in_any_log_line(srv: ServerProc) -> None:
    """Last in the module: after every path above (good, bad and minted tokens over
    CLI, HTTP and RPC, at debug level) no log or banner line holds a token."""
    assert srv.alive(), srv.stderr_tail()
    # One more round of failures right before the check.
    srv.http("GET", "/v1/rules", token=BAD_TOKEN)
    srv.http("GET", "/v1/rules/abc", token=srv.token)
    srv.http("POST", "/v1/rules", raw=b"{not json", token=srv.token)
    secrets_seen = [srv.token, BAD_TOKEN]
    minted = srv.workdir / "minted.token"
    if minted.exists():
        secrets_seen.append(minted.read_text().strip())
    logs = srv.stderr_text() + srv.stdout_path.read_text(errors="replace")
    assert len(srv.logs()) > 10, "the server logged almost nothing; the check would be empty"
    for tok in secrets_seen:
        hits = [ln for ln in logs.splitlines() if tok in ln]
        assert hits == [], f"token found in {len(hits)} log line(s): {hits[:2]}"
