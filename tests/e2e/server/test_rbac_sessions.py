"""Users end to end on a real server: the first-run setup link, login with the
session cookie (flags, CSRF), throttling, grants at push time, visibility,
audit rows of refusals, schema upgrade and backup/restore of users."""

from __future__ import annotations

import re
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import PortAllocator, ServerFactory, scrape, wait_for

from .rbac_world import PASSWORD, World, cli_stdin, expect_rpc_error, make_world

CSRF = {"X-Portunus-CSRF": "1"}


def _cookie(resp: Any) -> str:
    header = resp.headers["set-cookie"]
    match = re.match(r"portunus_session=([^;]*);", header)
    assert match, header
    return match.group(1)


def _with(session: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Cookie": f"portunus_session={session}", **(extra or {})}


def test_first_run_setup_link_creates_the_superadmin(server: ServerFactory) -> None:
    srv = server(shards=1)
    path = srv.data_dir / "setup.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    log = srv.stderr_tail(200)
    assert f"http://127.0.0.1:{srv.api_port}/setup?token={token}" in log
    bad = srv.http(
        "POST",
        "/v1/auth/setup",
        {"token": "x" + token, "user_id": "root", "password": PASSWORD},
        token=None,
    )
    assert (bad.status, bad.error_code) == (401, "invalid_setup_token")
    ok = srv.http(
        "POST",
        "/v1/auth/setup",
        {"token": token, "user_id": "root", "password": PASSWORD, "display_name": "Root"},
        token=None,
    )
    assert ok.status == 201, ok
    assert ok.json() == {
        "user_id": "root",
        "display_name": "Root",
        "role": "superadmin",
        "password_change_required": False,
    }
    session = _cookie(ok)
    assert not path.exists()
    me = srv.http("GET", "/v1/users/me", token=None, headers=_with(session))
    assert (me.status, me.json()["user_id"]) == (200, "root")
    again = srv.http(
        "POST",
        "/v1/auth/setup",
        {"token": token, "user_id": "root2", "password": PASSWORD},
        token=None,
    )
    assert (again.status, again.error_code) == (409, "conflict.setup_done")
    # A restart does not offer setup again.
    srv.restart()
    assert not path.exists()


@pytest.fixture(scope="module")
def world(server_module: ServerFactory, ports: PortAllocator) -> World:
    return make_world(server_module(shards=1), ports)


def test_cli_superadmin_with_password_ends_the_setup_link(world: World) -> None:
    assert not (world.srv.data_dir / "setup.token").exists()


def test_login_cookie_flags_csrf_and_logout(world: World) -> None:
    srv = world.srv
    resp = srv.http(
        "POST", "/v1/auth/login", {"user_id": "alice", "password": PASSWORD}, token=None
    )
    assert resp.status == 200, resp
    assert resp.json() == {
        "user_id": "alice",
        "display_name": "alice",
        "role": "user",
        "password_change_required": False,
    }
    flags = resp.headers["set-cookie"].split("; ")
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(flags) and "Secure" not in flags
    session = _cookie(resp)
    assert session not in resp.body.decode()
    with sqlite3.connect(srv.db_path) as db:
        assert session not in repr(db.execute("SELECT * FROM sessions").fetchall())
    assert srv.http("GET", "/v1/rules", token=None, headers=_with(session)).status == 200
    body = {
        "client": "local",
        "listen_port": world.port_of("alice"),
        "targets": [{"host": "127.0.0.1", "port": 9}],
    }
    refused = srv.http("POST", "/v1/rules", body, token=None, headers=_with(session))
    assert (refused.status, refused.error_code) == (403, "csrf_failed")
    foreign = srv.http(
        "POST",
        "/v1/rules",
        body,
        token=None,
        headers=_with(session, {**CSRF, "Origin": "http://evil.example"}),
    )
    assert (foreign.status, foreign.error_code) == (403, "csrf_failed")
    same = srv.http(
        "POST",
        "/v1/rules",
        body,
        token=None,
        headers=_with(session, {**CSRF, "Origin": f"http://127.0.0.1:{srv.api_port}"}),
    )
    assert same.status == 201 and same.json()["owner"] == "alice"
    entries = world.rpc("audit.list", {"limit": 50})["entries"]
    assert any(e["error_code"] == "csrf_failed" and e["actor"] == "alice" for e in entries)
    out = srv.http("POST", "/v1/auth/logout", token=None, headers=_with(session, CSRF))
    assert out.status == 204 and "Max-Age=0" in out.headers["set-cookie"]
    assert srv.http("GET", "/v1/users/me", token=None, headers=_with(session)).status == 401


def test_login_throttle_answers_429_with_retry_after(world: World) -> None:
    srv = world.srv
    for _ in range(5):
        r = srv.http(
            "POST", "/v1/auth/login", {"user_id": "bob", "password": "wrong password!!"}, token=None
        )
        assert (r.status, r.error_code) == (401, "invalid_login")
    unknown = srv.http(
        "POST", "/v1/auth/login", {"user_id": "nobody", "password": "wrong password!!"}, token=None
    )
    assert (unknown.status, unknown.error_code) == (401, "invalid_login")
    locked = srv.http(
        "POST", "/v1/auth/login", {"user_id": "bob", "password": PASSWORD}, token=None
    )
    assert (locked.status, locked.error_code) == (429, "rate_limited")
    # 60 s from the fifth failure, counted down in whole seconds while we get here.
    assert 50 <= int(locked.headers["retry-after"]) <= 60
    assert "wrong password" not in srv.stderr_tail(400)


def test_push_refusals_come_in_contract_order_and_say_what_is_missing(world: World) -> None:
    srv = world.srv
    lo, hi = world.ranges["alice"]
    res = srv.cli(
        "push-rule", "local", str(world.port_of("root")), "127.0.0.1:9", token=world.tokens["alice"]
    )
    assert res.code == 9 and "error: port_outside_grant: " in res.err and f"{lo}-{hi}" in res.err, (
        res.err
    )
    res = srv.cli(
        "push-rule",
        "local",
        str(world.port_of("alice")),
        "127.0.0.1:9",
        "--protocol",
        "udp",
        token=world.tokens["alice"],
    )
    assert res.code == 9 and "error: protocol_not_granted: " in res.err and "udp" in res.err, (
        res.err
    )
    res = srv.cli(
        "push-rule",
        "local",
        str(world.port_of("root")),
        "127.0.0.1:9",
        "--protocol",
        "udp",
        token=world.tokens["bob"],
    )
    assert (
        res.code == 9 and "error: client_not_granted: " in res.err and "grant-add bob" in res.err
    ), res.err
    # Two adjacent grants do not add up to a range over both.
    dave = world.user()
    base = world.ports.block(8)
    for a, b in ((base, base + 3), (base + 4, base + 7)):
        world.rpc(
            "grants.add",
            {"user_id": dave, "client": "*", "listen_port_start": a, "listen_port_end": b},
        )
    token = world.rpc("tokens.issue", {"user_id": dave})["token"]
    res = srv.cli(
        "push-rule",
        "local",
        f"{base + 2}-{base + 5}",
        f"127.0.0.1:{base + 2}-{base + 5}",
        token=token,
    )
    assert res.code == 9 and "port_outside_grant" in res.err, res.err
    res = srv.cli(
        "push-rule",
        "local",
        f"{base}-{base + 3}",
        f"127.0.0.1:{base}-{base + 3}",
        "--format",
        "json",
        token=token,
    )
    assert res.code == 0 and res.json["owner"] == dave, res.err
    # A superadmin pushing for a user is held to that user's grants.
    res = srv.cli(
        "push-rule",
        "local",
        str(world.port_of("root")),
        "127.0.0.1:9",
        "--owner",
        "alice",
        token=world.tokens["root"],
    )
    assert res.code == 9 and "port_outside_grant" in res.err, res.err


def test_users_see_their_own_rules_and_granted_clients(world: World) -> None:
    mine, theirs = world.rule("alice"), world.rule("carol")
    seen = {r["id"] for r in world.rpc("rules.list", who="alice")["rules"]}
    assert mine in seen and theirs not in seen
    assert all(r["owner"] == "alice" for r in world.rpc("rules.list", who="alice")["rules"])
    expect_rpc_error(lambda: world.rpc("rules.list", {"owner": "carol"}, who="alice"), "not_owner")
    everything = {r["id"] for r in world.rpc("rules.list")["rules"]}
    assert {mine, theirs} <= everything
    edge = world.client()
    assert edge not in {c["client_id"] for c in world.rpc("clients.list", who="alice")["clients"]}
    assert {c["client_id"] for c in world.rpc("clients.list", who="bob")["clients"]} == set()
    grant = world.rpc(
        "grants.add",
        {"user_id": "bob", "client": edge, "listen_port_start": 1, "listen_port_end": 2},
    )["grant_id"]
    assert {c["client_id"] for c in world.rpc("clients.list", who="bob")["clients"]} == {edge}
    world.rpc("grants.revoke", {"grant_id": grant})
    # The owner is a metrics label.
    metrics = scrape(world.srv.metrics_url)
    assert metrics.has("portunus_rule_state", rule=str(mine), owner="alice", state="active")
    assert metrics.has("portunus_rule_state", rule=str(theirs), owner="carol")


def test_refusals_and_writes_are_audited_without_secrets(world: World) -> None:
    before = world.rpc("audit.list", {"limit": 1})["entries"][0]["id"]
    world.srv.http("GET", "/v1/audit", token=world.tokens["alice"])
    world.srv.http("GET", "/v1/rules", token="not-a-valid-token")
    issued = world.rpc("tokens.issue", {"user_id": "bob", "name": "ci"})
    res = cli_stdin(
        world.srv,
        "user-passwd",
        "bob",
        "--password-stdin",
        stdin="yet another password\n",
        token=world.tokens["root"],
    )
    assert res.code == 0, res.err
    entries = [e for e in world.rpc("audit.list", {"limit": 100})["entries"] if e["id"] > before]
    rows = {(e["actor"], e["action"], e["outcome"], e["error_code"]) for e in entries}
    assert ("alice", "denied.audit.list", "error", "role_required") in rows
    assert ("anonymous", "denied.rules.list", "error", "unauthenticated") in rows
    assert ("root", "token.issue", "ok", None) in rows
    assert ("root", "user.password", "ok", None) in rows
    text = repr(entries)
    assert (
        issued["token"] not in text
        and "yet another password" not in text
        and "not-a-valid-token" not in text
    )
    assert all(len(str(e["target"] or "")) <= 80 for e in entries)


def test_upgrade_in_place_and_backup_restore_keep_users(
    server: ServerFactory, tmp_path: Path, ports: PortAllocator
) -> None:
    """A database from before users (schema 4) upgrades on start: its rule keeps
    owner '' (superadmins only); users, tokens and grants survive backup/restore,
    sessions do not."""
    from portunus.control.store.migrations import connect_sync, migrate

    srv = server(shards=1, start=False)
    srv.data_dir.mkdir(parents=True, exist_ok=True)
    conn = connect_sync(str(srv.db_path))
    migrate(conn, str(srv.db_path), target=4)
    port = ports.port()
    conn.execute(
        "INSERT INTO rules (client_id, protocol, listen_start, listen_end, owner, state, created_at) "
        "VALUES ('local', 'tcp', ?, ?, '', 'active', '2026-01-01T00:00:00.000Z')",
        (port, port),
    )
    conn.execute(
        "INSERT INTO rule_targets (rule_id, position, host, port, priority) VALUES (1, 0, '127.0.0.1', 9, 1)"
    )
    conn.close()
    srv.db_path.chmod(0o600)  # as Portunus creates it: serve refuses a state.db others can read
    srv.start()
    srv.wait_ready()
    w = make_world(srv, ports)
    old = w.rpc("rules.get", {"id": 1})
    assert old["owner"] == "" and old["state"] == "active"
    expect_rpc_error(lambda: w.rpc("rules.get", {"id": 1}, who="alice"), "not_owner")
    login = srv.http(
        "POST", "/v1/auth/login", {"user_id": "alice", "password": PASSWORD}, token=None
    )
    assert login.status == 200
    backup = tmp_path / "b.db"
    assert srv.cli("backup", "--out", str(backup), token=w.tokens["root"]).code == 0
    assert srv.stop() == 0
    res = srv.cli("restore", "--in", str(backup), "--force")
    assert res.code == 0, res.err
    srv.start()
    srv.wait_ready()
    users = {u["user_id"] for u in srv.rpc("users.list", token=w.tokens["root"])["users"]}
    assert {"root", "alice", "bob", "carol"} <= users
    assert srv.rpc("grants.list", {"user_id": "alice"}, token=w.tokens["alice"])["grants"]
    with sqlite3.connect(srv.db_path) as db:
        assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
    wait_for(lambda: srv.health_ok(), 10, what="healthy after restore")
