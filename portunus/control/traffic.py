"""Traffic history: the sampler that turns rule counters into bucketed deltas, and
the ``traffic.*`` RPC methods that read them back (GET /v1/traffic, the Web UI).

Runs in the control process.  Every ``interval`` seconds the sampler reads the
cumulative counters of every rule (local rules from the shards' metrics files,
remote rules from their client's latest stats frame) and stores the difference
from the previous reading.  Counters are not trusted to be monotonic: an edge
client that restarts starts again from zero, so a reading below the previous one
counts as "restarted" and its delta is the new value itself — never negative, and
never the whole lifetime total as one spike.  The first reading of a rule (after a
control restart, or a client whose stats are not known yet) only sets the
baseline, for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from portunus.bounds import RULE_ID
from portunus.control.auth import Principal
from portunus.control.store import Store
from portunus.control.store import traffic as db_traffic
from portunus.errors import PortunusError, ValidationError
from portunus.logs import log_event
from portunus.timefmt import parse_when

Reading = tuple[int, int, int]  # bytes_in, bytes_out, connections_total (cumulative)
ReadCounters = Callable[[Sequence[db_traffic.RuleKey]], Awaitable[dict[int, Reading]]]
ZERO: Reading = (0, 0, 0)
SAMPLE_INTERVAL = 10.0
PRUNE_EVERY = 3600.0
MAX_POINTS = 10_000
TOP_RULES_MAX = 50


def counter_delta(previous: int, current: int) -> int:
    """What a counter moved; a drop means it restarted from zero since ``previous``."""
    return current - previous if current >= previous else current


class TrafficSampler:
    """Keeps the last reading per rule and writes deltas (control process only)."""

    def __init__(
        self,
        store: Store,
        read_counters: ReadCounters,
        *,
        interval: float = SAMPLE_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.read_counters = read_counters
        self.interval = interval
        self.clock = clock
        self.last: dict[int, Reading] = {}
        # highest rule id at the previous sample; None before the first one
        self.max_seen: int | None = None
        # bytes/s of the latest sample per rule: "throughput now" on the dashboard
        self.rates: dict[int, tuple[float, float]] = {}
        self._last_ts: float | None = None
        self._last_prune = 0.0
        self._task: asyncio.Task[None] | None = None

    def deltas(
        self, rules: Sequence[db_traffic.RuleKey], readings: dict[int, Reading]
    ) -> list[db_traffic.Delta]:
        """Pure step: compare ``readings`` with the last ones and remember them.

        A rule created since the previous sample (ids only grow) started counting
        from zero, so its first reading is all traffic; a rule that existed before
        this process's first sample has unknown history, so its first reading is
        only the baseline."""
        out: list[db_traffic.Delta] = []
        live: set[int] = set()
        for stored in rules:
            rid = stored.rule_id
            live.add(rid)
            if rid not in self.last and self.max_seen is not None and rid > self.max_seen:
                self.last[rid] = ZERO
            current = readings.get(rid)
            if current is None:  # counters unknown right now (client offline): keep the baseline
                continue
            previous = self.last.get(rid)
            self.last[rid] = current
            if previous is None:
                continue
            moved = tuple(counter_delta(p, c) for p, c in zip(previous, current, strict=True))
            out.append(db_traffic.Delta(rid, stored.client_id, stored.owner, *moved))
        self.max_seen = max([self.max_seen or 0, *live])
        for gone in set(self.last) - live:
            del self.last[gone]
            self.rates.pop(gone, None)
        return out

    async def sample_once(self) -> int:
        """One reading of every rule; returns how many rules moved."""
        now = self.clock()
        async with self.store.read() as db:
            rules = await db_traffic.rule_keys(db)
        readings = await self.read_counters(rules)
        deltas = self.deltas(rules, readings)
        span = now - self._last_ts if self._last_ts is not None else 0.0
        self._last_ts = now
        self.rates = {
            d.rule_id: (d.bytes_in / span, d.bytes_out / span) if span > 0 else (0.0, 0.0)
            for d in deltas
        }
        async with self.store.write() as db:
            written = await db_traffic.add_deltas(db, now, deltas)
            if now - self._last_prune >= PRUNE_EVERY:
                self._last_prune = now
                await db_traffic.prune(db, now)
        return written

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="traffic-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.sample_once()
            except Exception as exc:  # noqa: BLE001 - a bad sample must not end the history
                log_event("traffic.sample_failed", level="warning", error=repr(exc))
            await asyncio.sleep(self.interval)


def counters_reader(metrics_dir: str, remote: Any) -> ReadCounters:
    """Readings for the sampler: local rules from the metrics files (one pass, in a
    thread), remote rules from their client's latest stats frame; a client with no
    frame yet (or offline) gives no reading, so its baseline is kept."""
    from portunus.control.dataplane import LOCAL
    from portunus.control.stats import rule_totals

    async def read(rules: Sequence[db_traffic.RuleKey]) -> dict[int, Reading]:
        # No local rule, no file to parse (a fleet server's rules are all remote).
        has_local = metrics_dir and any(r.client_id == LOCAL for r in rules)
        local = await asyncio.to_thread(rule_totals, metrics_dir) if has_local else {}
        out: dict[int, Reading] = {}
        for stored in rules:
            rid = str(stored.rule_id)
            if stored.client_id == LOCAL:
                out[stored.rule_id] = local.get(rid, (0, 0, 0))
                continue
            frame = remote.stats.get(stored.client_id) if remote is not None else None
            if frame is None or not remote.connected(stored.client_id) or rid not in frame:
                continue
            e = frame[rid]
            out[stored.rule_id] = (
                int(e.get("bytes_in") or 0),
                int(e.get("bytes_out") or 0),
                int(e.get("connections_total") or 0),
            )
        return out

    return read


# ------------------------------------------------------------------ queries


def _time(params: dict[str, Any], key: str, default: float) -> int:
    raw = params.get(key)
    if raw is None or raw == "":
        return int(default)
    try:
        return int(parse_when(raw).timestamp())
    except ValueError as exc:
        raise ValidationError(f"validation.{key}", f"{key}: {exc}", field=key) from None


def _resolution(params: dict[str, Any], start: int, end: int, now: float) -> int:
    raw = params.get("resolution")
    if raw in (None, ""):
        recent = start >= now - db_traffic.RETENTION[db_traffic.MINUTE]
        return db_traffic.MINUTE if recent and end - start <= 2 * 86400 else db_traffic.HOUR
    if raw in ("minute", 60):
        return db_traffic.MINUTE
    if raw in ("hour", 3600):
        return db_traffic.HOUR
    raise ValidationError(
        "validation.resolution", "resolution must be minute or hour", field="resolution"
    )


def scope_owner(who: Principal, params: dict[str, Any]) -> str | None:
    """Users read only their own rules' history; a superadmin may filter by anyone."""
    owner = params.get("owner")
    if owner is not None and not isinstance(owner, str):
        raise ValidationError("validation.owner", "owner must be a string", field="owner")
    if who.role == "superadmin":
        return owner or None
    if owner and owner != who.user:
        raise PortunusError(
            "not_owner", "users read the traffic of their own rules only", owner=owner
        )
    return who.user


async def query(
    store: Store, who: Principal, params: dict[str, Any], now: float | None = None
) -> dict[str, Any]:
    """``traffic.query``: one summed series, zero-filled, for a rule, client or owner."""
    now = time.time() if now is None else now
    end = _time(params, "to", now)
    start = _time(params, "from", end - 3600)
    if start >= end:
        raise ValidationError("validation.from", "from must be before to", field="from")
    res = _resolution(params, start, end, now)
    first = db_traffic.bucket_of(start, res)
    if (end - first) // res > MAX_POINTS:
        raise ValidationError(
            "validation.range",
            f"at most {MAX_POINTS} buckets per query; use resolution=hour or a shorter range",
            field="from",
        )
    owner = scope_owner(who, params)
    rule_id = params.get("rule")
    if rule_id is not None and (
        isinstance(rule_id, bool)
        or not (str(rule_id).isascii() and str(rule_id).isdigit())
        or len(str(rule_id)) > 19  # a SQLite INTEGER: 2**63 - 1 has 19 digits
        or not RULE_ID.contains(int(rule_id))
    ):
        raise ValidationError("validation.rule", "rule must be a rule id", field="rule")
    client_id: str | None = None
    async with store.read() as db:
        if rule_id and owner is not None:
            holder = await db_traffic.rule_owner(db, int(rule_id))
            if holder is not None and holder != owner:
                raise PortunusError(
                    "not_owner",
                    f"rule {rule_id} belongs to another user; you may read your own rules only",
                    id=int(rule_id),
                )
        if params.get("client"):
            from portunus.control.store.accounts import resolve_client

            client_id = (
                await resolve_client(db, str(params["client"]), include_revoked=True)
            ).client_id
        rows = await db_traffic.series(
            db,
            res,
            start,
            end,
            rule_id=int(rule_id) if rule_id else None,
            client_id=client_id,
            owner=owner,
        )
    by_ts = {r["ts"]: r for r in rows}
    zero = {"bytes_in": 0, "bytes_out": 0, "connections": 0}
    points = [by_ts.get(ts, {"ts": ts, **zero}) for ts in range(first, end, res)]
    return {
        "resolution": "minute" if res == db_traffic.MINUTE else "hour",
        "from": start,
        "to": end,
        "series": points,
    }


async def summary(
    store: Store, sampler: TrafficSampler | None, who: Principal, params: dict[str, Any]
) -> dict[str, Any]:
    """``traffic.summary``: throughput now and the top rules by bytes over a window."""
    owner = scope_owner(who, params)
    window = _time(params, "since", time.time() - 3600)
    limit = params.get("limit", 10)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= TOP_RULES_MAX:
        raise ValidationError(
            "validation.limit", f"limit must be an integer 0-{TOP_RULES_MAX}", field="limit"
        )
    async with store.read() as db:
        top = await db_traffic.top_rules(db, window, limit, owner) if limit else []
        mine = None if owner is None else {k.rule_id for k in await db_traffic.rule_keys(db, owner)}
    rates = sampler.rates if sampler is not None else {}
    now_in = sum(r[0] for rid, r in rates.items() if mine is None or rid in mine)
    now_out = sum(r[1] for rid, r in rates.items() if mine is None or rid in mine)
    return {
        "bytes_in_per_sec": round(now_in, 1),
        "bytes_out_per_sec": round(now_out, 1),
        "per_rule": {
            str(rid): {"bytes_in_per_sec": round(r[0], 1), "bytes_out_per_sec": round(r[1], 1)}
            for rid, r in rates.items()
            if mine is None or rid in mine
        },
        "top_rules": top,
        "since": window,
    }
