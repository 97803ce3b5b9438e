"""Web UI sessions in the control process: login, throttling, expiry, CSRF,
the password-change gate, first-run setup and token revocation."""

from __future__ import annotations

import os
from typing import Any

from portunus.control.auth import SESSION_IDLE_SECS, SESSION_MAX_SECS
from portunus.control.sessions import SETUP_TOKEN_FILE, SETUP_VALID_SECS
from portunus.control.store import users as users_db
from portunus.errors import PortunusError

from .conftest import expect_error
from .rbac_harness import PASSWORD, Rbac


async def _audit(h: Rbac) -> list[dict[str, Any]]:
    return list(reversed((await h.call("audit.list", {"limit": 1000}))["entries"]))


async def test_login_then_session_acts_as_the_user(rbac: Rbac) -> None:
    await rbac.user("alice")
    answer = await rbac.call(
        "auth.login", {"user_id": "alice", "password": PASSWORD, "source": "127.0.0.1"}, token=None
    )
    assert answer["user_id"] == "alice" and answer["role"] == "user"
    assert answer["password_change_required"] is False and len(answer["session_token"]) >= 40
    me = await rbac.call("users.me", token=None, session=answer["session_token"])
    assert me == {
        "user_id": "alice",
        "display_name": "alice",
        "role": "user",
        "password_change_required": False,
    }
    async with rbac.store.read() as db:
        async with db.execute("SELECT token_hash FROM sessions") as cur:
            stored = [r[0] for r in await cur.fetchall()]
    assert stored and answer["session_token"] not in stored  # only the hash is kept


async def test_wrong_password_and_unknown_user_look_the_same(rbac: Rbac) -> None:
    await rbac.user("alice")
    wrong = await expect_error(rbac.login("alice", "not the password!"), "invalid_login")
    unknown = await expect_error(rbac.login("nobody", "not the password!"), "invalid_login")
    assert wrong.message == unknown.message and wrong.exit_code == 4
    rows = [e for e in await _audit(rbac) if e["action"] == "auth.login"]
    assert [(e["actor"], e["outcome"], e["error_code"]) for e in rows] == [
        ("alice", "error", "invalid_login"),
        ("nobody", "error", "invalid_login"),
    ]
    assert "not the password" not in repr(await _audit(rbac))
    assert not [
        e for e in await _audit(rbac) if e["action"] == "denied.auth.login"
    ]  # recorded once


async def test_throttle_locks_after_five_failures_and_doubles(rbac: Rbac) -> None:
    await rbac.user("alice")
    for _ in range(5):
        await expect_error(rbac.login("alice", "wrong password!!"), "invalid_login")
    err = await expect_error(rbac.login("alice"), "rate_limited")  # even the right password waits
    assert err.details["retry_after"] == 60 and err.http_status == 429
    assert (await _audit(rbac))[-1]["error_code"] == "rate_limited"
    # Another source address is a different pair.
    assert await rbac.login("alice", source="127.0.0.2")
    rbac.clock.advance(61)
    assert await rbac.login("alice")  # success forgets the pair
    for _ in range(5):
        await expect_error(rbac.login("alice", "wrong password!!"), "invalid_login")
    assert (await expect_error(rbac.login("alice"), "rate_limited")).details["retry_after"] == 60
    rbac.clock.advance(61)
    for _ in range(5):
        await expect_error(rbac.login("alice", "wrong password!!"), "invalid_login")
    assert (await expect_error(rbac.login("alice"), "rate_limited")).details["retry_after"] == 120
    previous = 120
    for expected in (240, 480, 900, 900):
        rbac.clock.advance(previous + 1)
        for _ in range(5):
            await expect_error(rbac.login("alice", "wrong password!!"), "invalid_login")
        assert (await expect_error(rbac.login("alice"), "rate_limited")).details[
            "retry_after"
        ] == expected
        previous = expected
    # Fifteen quiet minutes after the lockout: forgotten, the next lockout is 60 s again.
    rbac.clock.advance(900 + 900 + 1)
    for _ in range(5):
        await expect_error(rbac.login("alice", "wrong password!!"), "invalid_login")
    assert (await expect_error(rbac.login("alice"), "rate_limited")).details["retry_after"] == 60


async def test_session_idle_and_absolute_expiry(rbac: Rbac) -> None:
    await rbac.user("alice")
    session = await rbac.login("alice")
    rbac.clock.advance(SESSION_IDLE_SECS - 60)
    assert (await rbac.call("users.me", token=None, session=session))[
        "user_id"
    ] == "alice"  # touched
    rbac.clock.advance(SESSION_IDLE_SECS - 60)
    assert (await rbac.call("users.me", token=None, session=session))["user_id"] == "alice"
    rbac.clock.advance(SESSION_IDLE_SECS + 1)
    await expect_error(rbac.call("users.me", token=None, session=session), "unauthenticated")
    # Absolute: used every few hours, still over after seven days.
    session = await rbac.login("alice")
    used = 0.0
    while used + 4 * 3600 < SESSION_MAX_SECS:
        rbac.clock.advance(4 * 3600)
        used += 4 * 3600
        await rbac.call("users.me", token=None, session=session)
    rbac.clock.advance(SESSION_MAX_SECS - used + 1)
    await expect_error(rbac.call("users.me", token=None, session=session), "unauthenticated")


async def test_logout_revokes_the_session(rbac: Rbac) -> None:
    await rbac.user("alice")
    session = await rbac.login("alice")
    await rbac.call("auth.logout", token=None, session=session, csrf=True)
    await expect_error(rbac.call("users.me", token=None, session=session), "unauthenticated")


async def test_csrf_is_required_on_session_writes_only(rbac: Rbac) -> None:
    await rbac.user("alice")
    session = await rbac.login("alice")
    assert (await rbac.call("rules.list", token=None, session=session))["rules"] == []
    err = await expect_error(rbac.call("auth.logout", token=None, session=session), "csrf_failed")
    assert err.http_status == 403 and err.exit_code == 9
    denied = [e for e in await _audit(rbac) if e["error_code"] == "csrf_failed"]
    assert (
        denied and denied[-1]["actor"] == "alice" and denied[-1]["action"] == "denied.auth.logout"
    )
    await rbac.call("auth.logout", token=None, session=session, csrf=True)


async def test_password_change_required_gates_everything_else(rbac: Rbac) -> None:
    created = await rbac.call("users.add", {"user_id": "bob"})
    temp = created["temporary_password"]
    assert created["password_change_required"] is True
    first = await rbac.login("bob", temp)
    second = await rbac.login("bob", temp)
    for method in ("rules.list", "clients.list", "grants.list"):
        err = await expect_error(
            rbac.call(method, token=None, session=first), "password_change_required"
        )
        assert err.http_status == 403
    assert (await rbac.call("users.me", token=None, session=first))[
        "password_change_required"
    ] is True
    await expect_error(
        rbac.call(
            "users.me.password",
            {"current_password": "wrong wrong wrong", "new_password": "a brand new secret"},
            token=None,
            session=first,
            csrf=True,
        ),
        "validation.current_password",
    )
    await expect_error(
        rbac.call(
            "users.me.password",
            {"current_password": temp, "new_password": "short"},
            token=None,
            session=first,
            csrf=True,
        ),
        "validation.password_too_short",
    )
    await rbac.call(
        "users.me.password",
        {"current_password": temp, "new_password": "a brand new secret"},
        token=None,
        session=first,
        csrf=True,
    )
    assert (await rbac.call("rules.list", token=None, session=first))["rules"] == []
    await expect_error(
        rbac.call("users.me", token=None, session=second), "unauthenticated"
    )  # others end
    await expect_error(rbac.login("bob", temp), "invalid_login")
    assert await rbac.login("bob", "a brand new secret")
    assert "a brand new secret" not in repr(await _audit(rbac)) and temp not in repr(
        await _audit(rbac)
    )


async def test_admin_passwd_revokes_sessions(rbac: Rbac) -> None:
    await rbac.user("alice")
    session = await rbac.login("alice")
    out = await rbac.call("users.passwd", {"user_id": "alice", "password": "another long secret"})
    assert out == {"user_id": "alice", "password_change_required": False, "revoked_sessions": 1}
    await expect_error(rbac.call("users.me", token=None, session=session), "unauthenticated")
    assert await rbac.login("alice", "another long secret")


async def test_revoked_token_fails_on_the_very_next_request(rbac: Rbac) -> None:
    token = await rbac.user("alice")
    assert (await rbac.call("rules.list", token=token))["rules"] == []  # used: touch cache is warm
    listed = (await rbac.call("tokens.list", {"user_id": "alice"}))["tokens"]
    await rbac.call("tokens.revoke", {"token_id": listed[0]["token_id"]})
    await expect_error(rbac.call("rules.list", token=token), "unauthenticated")
    assert (await rbac.call("tokens.list", {"user_id": "alice"}))["tokens"][0]["revoked_at"]


def _write_setup(h: Rbac, token: str = "setup-token-0123456789") -> str:
    path = os.path.join(h.settings.data_dir, SETUP_TOKEN_FILE)
    with open(path, "w") as f:
        f.write(token + "\n")
    os.utime(path, (h.clock.now, h.clock.now))
    return path


async def test_setup_token_creates_the_first_superadmin_once(rbac: Rbac) -> None:
    body = {"token": "setup-token-0123456789", "user_id": "root", "password": PASSWORD}
    await expect_error(rbac.call("auth.setup", body, token=None), "invalid_setup_token")  # no file
    path = _write_setup(rbac)
    await expect_error(
        rbac.call("auth.setup", {**body, "token": "setup-token-0123456780"}, token=None),
        "invalid_setup_token",
    )
    await expect_error(
        rbac.call("auth.setup", {**body, "password": "short"}, token=None),
        "validation.password_too_short",
    )
    rbac.clock.advance(SETUP_VALID_SECS + 1)
    await expect_error(rbac.call("auth.setup", body, token=None), "invalid_setup_token")
    os.utime(path, (rbac.clock.now, rbac.clock.now))
    answer = await rbac.call("auth.setup", {**body, "display_name": "Root"}, token=None)
    assert (answer["user_id"], answer["role"], answer["display_name"]) == (
        "root",
        "superadmin",
        "Root",
    )
    assert not os.path.exists(path)
    me = await rbac.call("users.me", token=None, session=answer["session_token"])
    assert me["role"] == "superadmin"
    _write_setup(rbac)
    await expect_error(
        rbac.call("auth.setup", {**body, "user_id": "root2"}, token=None), "conflict.setup_done"
    )


async def test_superadmin_with_password_via_users_add_ends_setup(rbac: Rbac) -> None:
    path = _write_setup(rbac)
    await rbac.call("users.add", {"user_id": "root", "role": "superadmin", "password": PASSWORD})
    assert not os.path.exists(path)
    async with rbac.store.read() as db:
        assert await users_db.superadmin_has_password(db)


async def test_passwords_are_argon2id_and_bounded(rbac: Rbac) -> None:
    await rbac.user("alice")
    async with rbac.store.read() as db:
        user = await users_db.find_user(db, "alice")
    assert user is not None and user.password_hash is not None
    assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
    # Bytes, not characters: 5 x 2 + 1 = 11 bytes is short, 6 x 2 = 12 bytes is enough.
    await expect_error(
        rbac.call("users.add", {"user_id": "x1", "password": "é" * 5 + "a"}),
        "validation.password_too_short",
    )
    assert (await rbac.call("users.add", {"user_id": "x2", "password": "é" * 6}))["user_id"] == "x2"
    err = await expect_error(
        rbac.call("users.add", {"user_id": "x3", "password": "p" * 1025}),
        "validation.password_too_long",
    )
    assert "ppp" not in err.message
    err2 = await expect_error(rbac.login("alice", "p" * 5000), "invalid_login")
    assert isinstance(err2, PortunusError)
