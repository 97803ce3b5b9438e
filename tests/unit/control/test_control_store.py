from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from portunus.control.store import Store, accounts, backup, write_audit
from portunus.control.store import rules as rules_db
from portunus.errors import PortunusError
from portunus.rules import Target, build_rule


def _rule(port: int = 8080, end: int | None = None, **kw: object) -> object:
    hi = end or port
    target = Target("10.0.0.5", 80, port_end=80 + hi - port if end else None)
    return build_rule(id="0", protocol="tcp", listen=(port, hi), targets=[target], **kw)


async def _count(store: Store, table: str) -> int:
    async with store.read() as db:
        async with db.execute(f"SELECT COUNT(*) FROM {table}") as cur:
            return (await cur.fetchone())[0]


async def test_insert_and_read_back_rule_json(store: Store) -> None:
    rule = _rule(8080, rate_limit={"bandwidth_in_bps": 1000}, sni="API.example.com")
    async with store.write() as db:
        rid = await rules_db.insert_rule(db, "local", rule)
        got = await rules_db.get_rule(db, rid)
    assert rid == 1 and got is not None
    j = got.to_json()
    assert j["id"] == 1 and j["client"] == "local" and j["client_id"] == "local"
    assert j["listen_port"] == 8080 and "listen_port_start" not in j
    assert j["targets"] == [{"host": "10.0.0.5", "port": 80, "priority": 1}]
    assert j["sni_pattern"] == "api.example.com"
    assert j["rate_limit"] == {"bandwidth_in_bps": 1000}
    assert j["state"] == "pending" and j["failure_reason"] is None
    assert j["created_at"].endswith("Z") and j["owner"] == ""
    assert got.rule.id == "1"


async def test_range_rule_json(store: Store) -> None:
    async with store.write() as db:
        rid = await rules_db.insert_rule(db, "local", _rule(30000, 30009))
        got = await rules_db.get_rule(db, rid)
    assert got is not None
    j = got.to_json()
    assert (j["listen_port_start"], j["listen_port_end"]) == (30000, 30009)
    assert "listen_port" not in j
    assert j["targets"] == [{"host": "10.0.0.5", "port_start": 80, "port_end": 89, "priority": 1}]


async def test_failed_write_leaves_no_change_and_no_audit(store: Store) -> None:
    before_audit = await _count(store, "audit")
    with pytest.raises(sqlite3.IntegrityError):
        async with store.write() as db:
            await write_audit(db, "alice", "rule.push", "rule:?")
            await rules_db.insert_rule(db, "local", _rule(8080))
            # Unknown client: the foreign key refuses the second row of the change.
            await rules_db.insert_rule(db, "no-such-client", _rule(8081))
    assert await _count(store, "audit") == before_audit
    assert await _count(store, "rules") == 0
    assert await _count(store, "rule_targets") == 0


async def test_exception_in_block_rolls_back(store: Store) -> None:
    with pytest.raises(RuntimeError):
        async with store.write() as db:
            await rules_db.insert_rule(db, "local", _rule(8080))
            await write_audit(db, "alice", "rule.push", "rule:1")
            raise RuntimeError("boom")
    assert await _count(store, "rules") == 0
    assert await _count(store, "audit") == 0


async def test_delete_cascades_targets(store: Store) -> None:
    async with store.write() as db:
        rid = await rules_db.insert_rule(db, "local", _rule(8080))
    assert await _count(store, "rule_targets") == 1
    async with store.write() as db:
        await rules_db.delete_rule(db, rid)
    assert await _count(store, "rule_targets") == 0


async def test_list_filters_and_order(store: Store) -> None:
    async with store.write() as db:
        edge = await accounts.insert_client(db, "edge")
        await rules_db.insert_rule(db, "local", _rule(8080))
        await rules_db.insert_rule(db, edge.client_id, _rule(8080))
        await rules_db.insert_rule(db, "local", _rule(8081, owner="7"))
    async with store.read() as db:
        assert [s.rule_id for s in await rules_db.list_rules(db)] == [1, 2, 3]
        assert [s.rule_id for s in await rules_db.list_rules(db, client_id="local")] == [1, 3]
        assert [s.rule_id for s in await rules_db.list_rules(db, owner="7")] == [3]
        found = await rules_db.list_rules(db, client_id=edge.client_id)
        assert found[0].rule.client == "edge"


async def test_resolve_client_by_name_and_id(store: Store) -> None:
    async with store.write() as db:
        a = await accounts.insert_client(db, "edge")
        b = await accounts.insert_client(db, "edge")
        c = await accounts.insert_client(db, "solo")
    async with store.read() as db:
        assert (await accounts.resolve_client(db, "local")).client_id == "local"
        assert (await accounts.resolve_client(db, "solo")).client_id == c.client_id
        assert (await accounts.resolve_client(db, a.client_id)).name == "edge"
        with pytest.raises(PortunusError) as amb:
            await accounts.resolve_client(db, "edge")
        with pytest.raises(PortunusError) as missing:
            await accounts.resolve_client(db, "nowhere")
    assert amb.value.code == "ambiguous_client"
    assert sorted(amb.value.details["client_ids"]) == sorted([a.client_id, b.client_id])
    assert a.client_id in amb.value.message
    assert missing.value.code == "client_not_found" and missing.value.exit_code == 5


def test_ulids_are_unique_sortable_crockford() -> None:
    ids = [accounts.new_ulid() for _ in range(200)]
    assert len(set(ids)) == 200
    assert all(len(i) == 26 and set(i) <= set(accounts._CROCKFORD) for i in ids)


async def test_backup_while_store_is_open(store: Store, tmp_path: Path) -> None:
    async with store.write() as db:
        await rules_db.insert_rule(db, "local", _rule(8080))
        await write_audit(db, "alice", "rule.push", "rule:1")
    out = tmp_path / "backup.db"
    backup(store.path, str(out))
    conn = sqlite3.connect(out)
    try:
        assert conn.execute("SELECT listen_start FROM rules").fetchall() == [(8080,)]
        assert conn.execute("SELECT actor FROM audit").fetchall() == [("alice",)]
    finally:
        conn.close()
    assert out.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("backup.db.tmp-*"))


def test_backup_of_missing_database(tmp_path: Path) -> None:
    with pytest.raises(PortunusError) as info:
        backup(str(tmp_path / "none.db"), str(tmp_path / "out.db"))
    assert info.value.code == "not_found"
    assert not (tmp_path / "out.db").exists()
