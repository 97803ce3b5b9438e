"""Rule counters that survive restarts: stored totals plus live deltas.

Live counts start from zero whenever the process that counts them starts: the
shards of a new ``serve`` (its supervisor wipes the multiprocess dir), or a
restarted edge client.  So the control process keeps, per rule, in
``rule_counters``:

- ``carried``: what earlier runs of the counting process had counted;
- ``last``: what the current run had counted at the last snapshot;
- ``run``: which run that was (``PORTUNUS_RUN_ID`` of the supervisor that counts:
  this server's for local rules, the client's, from its ``stats`` frames, for
  edge rules).

When a report comes from another run, the previous run's ``last`` is banked into
``carried``: the rule's total is ``carried + live`` and never goes backwards.  A
count that shrinks within one run (a client that predates run ids restarted) is
treated the same way.  Snapshots are taken every ``SNAPSHOT_SECS`` and when
control stops, so a clean restart loses nothing and a crash at most the last
interval.

Only the three totals are carried (bytes in/out, connections); active
connections, per-port and per-target rows are live values.

The snapshot also writes ``<runtime>/rule_counters.json`` for the web process's
/metrics: the carried base of each local rule (added to the shards' series) and
the full totals of each edge rule (exported with the edge client's name as
``client``), so /metrics counts across restarts and shows edge clients' rules.
Control takes a snapshot before it says ``up``; a file left by an earlier run (its
``run`` differs) is read as that run's final ``known`` totals, so /metrics never
goes backwards across a restart, not even for a scrape in between.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any

from portunus.control.dataplane import LOCAL
from portunus.control.store import rules as rules_db
from portunus.control.store import utc_now
from portunus.fsutil import write_private_json
from portunus.logs import log_event

COUNTED = ("bytes_in", "bytes_out", "connections_total")
SNAPSHOT_SECS = 2.0
TOTALS_FILE = "rule_counters.json"


def run_id() -> str:
    """This service's run (set by the supervisor before it forks anything)."""
    return os.environ.get("PORTUNUS_RUN_ID", "")


@dataclass
class Carry:
    carried: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))
    last: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))
    run: str | None = None

    def base(self, run: str | None) -> dict[str, int]:
        """What to add to ``run``'s live counts: earlier runs' totals."""
        if self.run is not None and run != self.run:
            return {k: self.carried[k] + self.last[k] for k in COUNTED}
        return dict(self.carried)

    def advance(self, live: dict[str, Any], run: str | None) -> bool:
        """Take a report of ``run``'s live counts; returns True when something changed."""
        now = {k: int(live.get(k) or 0) for k in COUNTED}
        shrank = any(now[k] < self.last[k] for k in COUNTED)
        if (self.run is not None and run != self.run) or shrank:
            self.carried = {k: self.carried[k] + self.last[k] for k in COUNTED}
        elif now == self.last and run == self.run:
            return False
        self.last, self.run = now, run
        return True

    def known(self) -> dict[str, int]:
        """Everything counted so far, as of the last report."""
        return {k: self.carried[k] + self.last[k] for k in COUNTED}

    def total(self, live: dict[str, Any], run: str | None) -> dict[str, int]:
        base = self.base(run)
        return {k: base[k] + int(live.get(k) or 0) for k in COUNTED}


class RuleCounters:
    """Carried totals of every rule, in memory and in ``rule_counters``."""

    def __init__(self, store: Any, settings: Any, remote: Any | None) -> None:
        self.store = store
        self.settings = settings
        self.remote = remote
        self.run = run_id()
        self.carry: dict[int, Carry] = {}
        self._dirty: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._exported: dict[str, Any] | None = None

    async def load(self) -> None:
        async with self.store.read() as db:
            async with db.execute(
                "SELECT rule_id, carried_bytes_in, carried_bytes_out, carried_connections,"
                " last_bytes_in, last_bytes_out, last_connections, run FROM rule_counters"
            ) as cur:
                rows = await cur.fetchall()
        for r in rows:
            self.carry[int(r[0])] = Carry(
                dict(zip(COUNTED, (int(r[1]), int(r[2]), int(r[3])), strict=True)),
                dict(zip(COUNTED, (int(r[4]), int(r[5]), int(r[6])), strict=True)),
                r[7],
            )

    # ------------------------------------------------------------ queries

    def local_stats(self, rule_id: int, live: dict[str, Any]) -> dict[str, Any]:
        """``rules.stats`` of a local rule: live counts plus earlier runs'."""
        return self._with_base(rule_id, live, self.run)

    def remote_stats(self, client_id: str, rule_id: int, live: dict[str, Any]) -> dict[str, Any]:
        run = self.remote.runs.get(client_id) if self.remote is not None else None
        return self._with_base(rule_id, live, run)

    def _with_base(self, rule_id: int, live: dict[str, Any], run: str | None) -> dict[str, Any]:
        carry = self.carry.get(rule_id)
        if carry is None:
            return live
        out = dict(live)
        out.update(carry.total(live, run))
        return out

    # ---------------------------------------------------------- snapshots

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.snapshot()  # the shards have drained by now: the final counts
        except Exception as exc:  # noqa: BLE001 - stopping must go on
            log_event("counters.snapshot_failed", level="error", error=repr(exc))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_SECS)
            try:
                await self.snapshot()
            except Exception as exc:  # noqa: BLE001 - counters must not stop control
                log_event("counters.snapshot_failed", level="error", error=repr(exc))

    async def snapshot(self) -> None:
        from portunus.metrics.per_rule import rule_totals

        async with self.store.read() as db:
            stored = await rules_db.list_rules(db)
        local = [s for s in stored if s.client_id == LOCAL]
        live_local = (
            await asyncio.to_thread(
                rule_totals, self.settings.metrics_dir, [str(s.rule_id) for s in local]
            )
            if local
            else {}
        )
        export: dict[str, Any] = {"run": self.run, "local": {}, "remote": {}}
        for s in stored:
            carry = self.carry.setdefault(s.rule_id, Carry())
            if s.client_id == LOCAL:
                live = live_local.get(str(s.rule_id), {})
                run: str | None = self.run
            else:
                reports = self.remote.stats.get(s.client_id) if self.remote is not None else None
                run = self.remote.runs.get(s.client_id) if self.remote is not None else None
                reported = (reports or {}).get(str(s.rule_id))
                if reported is None:  # nothing reported this run: keep what we have
                    export["remote"][str(s.rule_id)] = self._remote_row(s, carry.known(), {}, False)
                    continue
                live = reported
            if carry.advance(live, run):
                self._dirty.add(s.rule_id)
            if s.client_id == LOCAL:
                base = carry.base(self.run)
                if any(base.values()) or any(carry.last.values()):
                    # "known": what a later run starts from, for a web process that reads
                    # this file before the next run's first snapshot replaced it.
                    export["local"][str(s.rule_id)] = {
                        "client": s.rule.client,
                        "owner": s.rule.owner,
                        **base,
                        "known": carry.known(),
                    }
            else:
                connected = self.remote is not None and self.remote.connected(s.client_id)
                export["remote"][str(s.rule_id)] = self._remote_row(
                    s, carry.total(live, run), live, connected
                )
        # A removed rule's carry would otherwise stay for the life of the process
        # (its rule_counters row goes with the rule: ON DELETE CASCADE).
        for gone in set(self.carry) - {s.rule_id for s in stored}:
            del self.carry[gone]
            self._dirty.discard(gone)
        await self._persist()
        if export != self._exported:  # idle rules: no rewrite every snapshot
            await asyncio.to_thread(
                write_private_json, os.path.join(self.settings.runtime_dir, TOTALS_FILE), export
            )
            self._exported = export

    @staticmethod
    def _remote_row(
        s: Any, totals: dict[str, int], live: dict[str, Any], connected: bool
    ) -> dict[str, Any]:
        return {
            "client": s.rule.client,
            "owner": s.rule.owner,
            **totals,
            "active_connections": int(live.get("active_connections") or 0) if connected else 0,
        }

    async def _persist(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        now = utc_now()
        async with self.store.write() as db:
            for rule_id in dirty:
                c = self.carry.get(rule_id)
                if c is None:
                    continue
                await db.execute(
                    "INSERT INTO rule_counters (rule_id, carried_bytes_in, carried_bytes_out,"
                    " carried_connections, last_bytes_in, last_bytes_out, last_connections, run, updated_at)"
                    " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM rules WHERE id = ?)"
                    " ON CONFLICT (rule_id) DO UPDATE SET carried_bytes_in = excluded.carried_bytes_in,"
                    " carried_bytes_out = excluded.carried_bytes_out,"
                    " carried_connections = excluded.carried_connections,"
                    " last_bytes_in = excluded.last_bytes_in, last_bytes_out = excluded.last_bytes_out,"
                    " last_connections = excluded.last_connections, run = excluded.run,"
                    " updated_at = excluded.updated_at",
                    (
                        rule_id,
                        *(c.carried[k] for k in COUNTED),
                        *(c.last[k] for k in COUNTED),
                        c.run,
                        now,
                        rule_id,
                    ),
                )


def read_totals_file(runtime_dir: str) -> dict[str, Any]:
    """The web process's view of the last snapshot (empty when there is none yet)."""
    try:
        with open(os.path.join(runtime_dir, TOTALS_FILE), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {"local": {}, "remote": {}}
    return doc if isinstance(doc, dict) else {"local": {}, "remote": {}}
