from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from portunus.config import Settings
from portunus.control.auth import (
    Authenticator,
    hash_token,
    install_operator_token,
    read_operator_token,
)
from portunus.control.store import Store, bootstrap_superadmin
from portunus.errors import EXIT_CONFLICT, PortunusError


def _db_bytes(db: Path) -> bytes:
    """Every byte SQLite keeps for the database (main file, WAL, shared memory)."""
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_hash_is_sha256_hex() -> None:
    assert hash_token("abc") == hashlib.sha256(b"abc").hexdigest()


def test_bootstrap_superadmin_on_fresh_db(tmp_path: Path) -> None:
    db = tmp_path / "data" / "state.db"
    token = bootstrap_superadmin(str(db), "alice")
    assert len(token) >= 40
    assert db.stat().st_mode & 0o777 == 0o600
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT role FROM users WHERE name = 'alice'").fetchone() == (
            "superadmin",
        )
        (stored,) = conn.execute(
            "SELECT token_hash FROM tokens t JOIN users u ON u.id = t.user_id WHERE u.name = 'alice'"
        ).fetchone()
        audit = conn.execute("SELECT actor, action, target, outcome FROM audit").fetchall()
    finally:
        conn.close()
    assert stored == hash_token(token)
    assert audit == [("cli:bootstrap-superadmin", "user.bootstrap", "user:alice", "ok")]
    assert token.encode() not in _db_bytes(db)


def test_bootstrap_superadmin_refuses_existing_name(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    bootstrap_superadmin(db, "alice")
    with pytest.raises(PortunusError) as info:
        bootstrap_superadmin(db, "alice")
    assert info.value.code == "conflict" and info.value.exit_code == EXIT_CONFLICT
    with pytest.raises(PortunusError) as builtin:
        bootstrap_superadmin(db, "operator")
    assert builtin.value.code == "conflict"
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM tokens").fetchone() == (1,)
    conn.close()


def test_bootstrap_superadmin_validates_name(tmp_path: Path) -> None:
    with pytest.raises(PortunusError) as info:
        bootstrap_superadmin(str(tmp_path / "state.db"), "bad name!")
    assert info.value.code.startswith("validation.")


async def test_bootstrap_next_to_a_running_store(store: Store) -> None:
    token = bootstrap_superadmin(store.path, "bob")
    who = await Authenticator(store).authenticate(token)
    assert (who.user, who.role) == ("bob", "superadmin")


async def test_authenticate_good_bad_missing(store: Store) -> None:
    token = bootstrap_superadmin(store.path, "carol")
    auth = Authenticator(store)
    who = await auth.authenticate(token)
    assert who.user == "carol" and who.token_id > 0
    for bad in (None, "", "x" * 600, token + "x", 42):
        with pytest.raises(PortunusError) as info:
            await auth.authenticate(bad)
        assert info.value.code == "unauthenticated" and info.value.exit_code == 4
    async with store.read() as db:
        async with db.execute(
            "SELECT last_used_at FROM tokens WHERE id = ?", (who.token_id,)
        ) as cur:
            assert (await cur.fetchone())[0] is not None


async def test_operator_token_upsert_replaces_previous(store: Store) -> None:
    auth = Authenticator(store)
    first = "operator-token-one-" + "a" * 30
    second = "operator-token-two-" + "b" * 30
    tid = await install_operator_token(store, first)
    assert (await auth.authenticate(first)).user == "operator"
    assert await install_operator_token(store, first) == tid  # unchanged: same row
    assert await install_operator_token(store, second) == tid
    assert (await auth.authenticate(second)).role == "superadmin"
    with pytest.raises(PortunusError):
        await auth.authenticate(first)
    async with store.read() as db:
        async with db.execute(
            "SELECT COUNT(*) FROM audit WHERE action = 'token.operator_install'"
        ) as cur:
            assert (await cur.fetchone())[0] == 2
    for t in (first, second):
        assert t.encode() not in _db_bytes(Path(store.path))


def test_read_operator_token_prefers_settings(tmp_path: Path) -> None:
    s = Settings(data_dir=str(tmp_path))
    assert read_operator_token(s) is None
    Path(s.token_path).write_text("from-file\n")
    assert read_operator_token(s) == "from-file"
    s.operator_token = "from-toml"
    assert read_operator_token(s) == "from-toml"
