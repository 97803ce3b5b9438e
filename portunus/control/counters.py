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

A snapshot costs what moved, not the size of the fleet: the rule set is read once,
then kept fresh from a journal of the rule ids that changed (store/rule_journal.py);
an edge client's rules are looked at only when a new ``stats`` frame, run or
connection came from it; each rule's member of the file is kept as JSON text and
the file is rewritten only when one of them changed.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any

from portunus.control.dataplane import LOCAL
from portunus.control.store import rule_journal, utc_now
from portunus.control.store.rule_journal import CountedRule
from portunus.fsutil import replace_file
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
        # What the snapshot knows of the rule set (store/rule_journal.py keeps it fresh).
        self.rules: dict[int, CountedRule] = {}
        self.by_client: dict[str, set[int]] = {}
        self._primed = False
        self._touched: set[int] = set()  # new or renamed rules whose rows are not rebuilt yet
        # Per edge client: (its latest stats frame, run, connected) at the last look.
        self._seen: dict[str, tuple[Any, str | None, bool]] = {}
        # The totals file's members, ``"<rule id>":{...}``, rebuilt only when they change.
        self._rows_local: dict[int, str] = {}
        self._rows_remote: dict[int, str] = {}
        self._export_dirty = False
        self._written = False

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
        """Bank what moved since the last snapshot; rewrite the totals file if any row
        of it changed.  Incremental (issue 16: 30,000 rules on 10,000 clients): the
        rule set comes from the store's journal (store/rule_journal.py), an edge
        client's rules are looked at only when its latest ``stats`` frame, run or
        connection changed, and each rule's row of the file is kept as JSON text."""
        # Kept until a snapshot got through: a failed one (a shard's metrics file caught
        # while it is created) must not lose the rows it was to rebuild.
        self._touched |= await self._refresh_rules()
        await self._snapshot_local(self._touched)
        self._snapshot_remote(self._touched)
        self._touched = set()
        await self._persist()
        if self._export_dirty or not self._written:  # idle rules: no rewrite every snapshot
            text = _export_text(self.run, self._rows_local, self._rows_remote)
            path = os.path.join(self.settings.runtime_dir, TOTALS_FILE)
            await asyncio.to_thread(replace_file, path, text.encode())
            self._export_dirty, self._written = False, True

    async def _refresh_rules(self) -> set[int]:
        """Apply the journal to ``self.rules``; returns the ids of the rules that are
        new or whose client name or owner changed (their rows are rebuilt)."""
        async with self.store.read() as db:
            if self._primed:
                changed = await rule_journal.take(db)
                fresh = await rule_journal.read(db, changed) if changed else {}
            else:
                await rule_journal.install(db)
                fresh = {r.rule_id: r for r in await rule_journal.read_all(db)}
                changed = list(fresh)
        if not self._primed:
            # A carry without a rule (its rule_counters row goes with the rule: ON
            # DELETE CASCADE) would otherwise stay for the life of the process.
            for gone in set(self.carry) - set(fresh):
                del self.carry[gone]
            self._primed = True
        for rule_id in changed:
            now = fresh.get(rule_id)
            old = self.rules.get(rule_id)
            if old is not None and (now is None or now.client_id != old.client_id):
                self._forget(rule_id, old.client_id, deleted=now is None)
            if now is not None:
                self.rules[rule_id] = now
                self.by_client.setdefault(now.client_id, set()).add(rule_id)
        return {i for i in changed if i in fresh}

    def _forget(self, rule_id: int, client_id: str, deleted: bool) -> None:
        """Take a rule off ``client_id``'s list (it moved, or was deleted: then its
        carry goes too, or rule churn would grow control for ever)."""
        self.rules.pop(rule_id, None)
        ids = self.by_client.get(client_id)
        if ids is not None:
            ids.discard(rule_id)
            if not ids:
                del self.by_client[client_id]
                self._seen.pop(client_id, None)
        if deleted:
            self.carry.pop(rule_id, None)
            self._dirty.discard(rule_id)
        for rows in (self._rows_local, self._rows_remote):
            if rows.pop(rule_id, None) is not None:
                self._export_dirty = True

    async def _snapshot_local(self, touched: set[int]) -> None:
        """Local rules: live counts from the shards' metrics files (one pass, in a thread)."""
        from portunus.metrics.per_rule import rule_totals

        local = self.by_client.get(LOCAL)
        if not local:
            return
        live_local = await asyncio.to_thread(
            rule_totals, self.settings.metrics_dir, [str(i) for i in local]
        )
        for rule_id in list(local):
            r = self.rules.get(rule_id)
            if r is None:
                continue
            carry = self.carry.setdefault(rule_id, Carry())
            moved = carry.advance(live_local.get(str(rule_id), {}), self.run)
            if moved:
                self._dirty.add(rule_id)
            if not (moved or rule_id in touched):
                continue
            base = carry.base(self.run)
            if any(base.values()) or any(carry.last.values()):
                # "known": what a later run starts from, for a web process that reads
                # this file before the next run's first snapshot replaced it.
                row = {"client": r.client, "owner": r.owner, **base, "known": carry.known()}
                self._put(self._rows_local, rule_id, row)
            elif self._rows_local.pop(rule_id, None) is not None:
                self._export_dirty = True

    def _snapshot_remote(self, touched: set[int]) -> None:
        """Edge rules: a client's rules are looked at only if its latest ``stats``
        frame (a new dict per frame), its run or its connection changed, or one of
        its rules is new or renamed: an idle fleet costs one look per client."""
        remote = self.remote
        redo_of: dict[str, set[int]] = {}
        for rule_id in touched:
            r = self.rules.get(rule_id)  # None: removed since it was touched
            if r is not None and r.client_id != LOCAL:
                redo_of.setdefault(r.client_id, set()).add(rule_id)
        for client_id, ids in self.by_client.items():
            if client_id == LOCAL:
                continue
            reports = remote.stats.get(client_id) if remote is not None else None
            run = remote.runs.get(client_id) if remote is not None else None
            connected = remote is not None and remote.connected(client_id)
            seen = self._seen.get(client_id)
            if seen is not None and seen[0] is reports and seen[1:] == (run, connected):
                redo = redo_of.get(client_id)
                if not redo:
                    continue
            else:
                self._seen[client_id] = (reports, run, connected)
                redo = ids
            for rule_id in redo:
                self._remote_rule(self.rules[rule_id], reports, run, connected)

    def _remote_rule(
        self, r: CountedRule, reports: dict[str, Any] | None, run: str | None, connected: bool
    ) -> None:
        carry = self.carry.setdefault(r.rule_id, Carry())
        reported = (reports or {}).get(str(r.rule_id))
        if reported is None:  # nothing reported this run: keep what we have
            self._put(self._rows_remote, r.rule_id, _remote_row(r, carry.known(), {}, False))
            return
        if carry.advance(reported, run):
            self._dirty.add(r.rule_id)
        row = _remote_row(r, carry.total(reported, run), reported, connected)
        self._put(self._rows_remote, r.rule_id, row)

    def _put(self, rows: dict[int, str], rule_id: int, row: dict[str, Any]) -> None:
        """Keep ``row`` as its JSON member text; note whether the file must change."""
        text = f'"{rule_id}":{json.dumps(row, separators=(",", ":"), sort_keys=True)}'
        if rows.get(rule_id) != text:
            rows[rule_id] = text
            self._export_dirty = True

    async def _persist(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        now = utc_now()
        params = [
            (
                rule_id,
                *(c.carried[k] for k in COUNTED),
                *(c.last[k] for k in COUNTED),
                c.run,
                now,
                rule_id,
            )
            for rule_id in sorted(dirty)
            if (c := self.carry.get(rule_id)) is not None
        ]
        async with self.store.write() as db:
            await db.executemany(
                "INSERT INTO rule_counters (rule_id, carried_bytes_in, carried_bytes_out,"
                " carried_connections, last_bytes_in, last_bytes_out, last_connections, run, updated_at)"
                " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM rules WHERE id = ?)"
                " ON CONFLICT (rule_id) DO UPDATE SET carried_bytes_in = excluded.carried_bytes_in,"
                " carried_bytes_out = excluded.carried_bytes_out,"
                " carried_connections = excluded.carried_connections,"
                " last_bytes_in = excluded.last_bytes_in, last_bytes_out = excluded.last_bytes_out,"
                " last_connections = excluded.last_connections, run = excluded.run,"
                " updated_at = excluded.updated_at",
                params,
            )


def _remote_row(
    r: CountedRule, totals: dict[str, int], live: dict[str, Any], connected: bool
) -> dict[str, Any]:
    return {
        "client": r.client,
        "owner": r.owner,
        **totals,
        "active_connections": int(live.get("active_connections") or 0) if connected else 0,
    }


def _export_text(run: str, local: dict[int, str], remote: dict[int, str]) -> str:
    """The totals file from the rows' JSON texts (no re-encoding of idle rows)."""
    return (
        f'{{"local":{{{",".join(local.values())}}},'
        f'"remote":{{{",".join(remote.values())}}},'
        f'"run":{json.dumps(run)}}}\n'
    )


def read_totals_file(runtime_dir: str) -> dict[str, Any]:
    """The web process's view of the last snapshot (empty when there is none yet)."""
    try:
        with open(os.path.join(runtime_dir, TOTALS_FILE), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {"local": {}, "remote": {}}
    return doc if isinstance(doc, dict) else {"local": {}, "remote": {}}
