"""The control process's one connection to state.db.

There is exactly one writer in the whole appliance (this process), and one
aiosqlite connection in it.  Every access takes ``Store.lock``: aiosqlite runs
statements in order on one thread, but a coroutine that awaits between two
statements would otherwise let another coroutine's statements land inside its
transaction, and a reader on the same connection would see writes that are not
committed yet.  ``write()`` is ``BEGIN IMMEDIATE`` … ``COMMIT`` — a change and its
audit row commit together or not at all, and a caller acknowledges a write only
after the ``async with`` block has exited.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

from portunus.control.store.audit_values import audit_text, audit_value
from portunus.control.store.migrations import BUSY_TIMEOUT_MS, connect_sync, migrate, utc_now
from portunus.errors import PortunusError


class Store:
    """Owns the aiosqlite connection; open with ``await Store.open(path)``."""

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db = db
        self.path = path
        self.lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str) -> Store:
        """Migrate (synchronously, before anyone is served) and connect."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

        def _migrate() -> None:
            conn = connect_sync(path)
            try:
                migrate(conn, path)
            finally:
                conn.close()

        await asyncio.to_thread(_migrate)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA journal_mode = WAL")
        try:
            os.chmod(path, 0o600)
        except OSError:
            pass
        return cls(db, path)

    async def close(self) -> None:
        async with self.lock:
            await self.db.close()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One transaction; rolled back if the block raises."""
        async with self.lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[aiosqlite.Connection]:
        """Serialised read access (sees only committed data, see module doc)."""
        async with self.lock:
            yield self.db


async def write_audit(
    db: aiosqlite.Connection,
    actor: str,
    action: str,
    target: str | None,
    outcome: str = "ok",
    error_code: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Append one audit row inside the caller's transaction; every value is bounded
    and escaped (``audit_values``), whatever the caller passes."""
    await db.execute(
        "INSERT INTO audit (ts, actor, action, target, outcome, error_code, details) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            utc_now(),
            audit_text(actor),
            audit_text(action),
            audit_text(target) if target is not None else None,
            audit_text(outcome),
            audit_text(error_code) if error_code is not None else None,
            json.dumps(audit_value(details), separators=(",", ":")) if details else None,
        ),
    )


async def audit_refusal(
    store: Store,
    actor: str,
    action: str,
    target: str | None,
    exc: PortunusError,
    **details: Any,
) -> None:
    """Record a refused operation (it changed nothing, but is still on the record).

    The row every service writes for a refusal: ``outcome="error"``, the error's code,
    its message plus any ``details`` the caller adds; in a write transaction of its own.
    """
    async with store.write() as db:
        await write_audit(
            db,
            actor,
            action,
            target,
            outcome="error",
            error_code=exc.code,
            details={"message": exc.message, **details},
        )
