"""The fake edge fleet spread over several processes (bench/edge_clients.py
``--fleet-procs``).

A real fleet is thousands of machines; the fake one is Python processes on the
same 2 CPUs as the server.  One process runs every fake's TLS handshake, frames and
timers on one event loop, so in a 10,000-client restart storm it saturates one core
while the server waits for it: the storm then measures the harness, not the server
(bench/ANALYSIS.md, "Edge clients at 10,000: the restart storm re-measured").
``FleetGroup`` has the one-process ``Fleet``'s interface and splits every command
over ``procs`` of them: enrollment and connects are divided into contiguous slices
(results keep the caller's order), status maps are merged; each process's
``time.monotonic()`` values are comparable (one clock on Linux).
"""

from __future__ import annotations

import os
from typing import Any

from bench.edge_fleet import Fleet, Identity

Status = dict[str, tuple[bool, int, int, float, int, int, str, int]]


def default_procs(clients: int, cpus: int | None = None) -> int:
    """One process per 2,500 fakes, at most one per CPU: a small fleet gains nothing
    from more processes, and more busy processes than CPUs only take the server's
    share of them (the scheduler shares CPU per runnable thread)."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, min(cpus, -(-clients // 2500)))


def _slices(items: list[Any], n: int) -> list[list[Any]]:
    """``items`` cut into ``n`` contiguous slices of near-equal size (some may be empty)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class FleetGroup:
    """``procs`` fleet processes behind the interface of one ``Fleet``."""

    def __init__(self, procs: int = 1) -> None:
        if procs < 1:
            raise ValueError("a fleet needs at least one process")
        self.fleets: list[Fleet] = []
        try:
            for _ in range(procs):
                self.fleets.append(Fleet())
        except BaseException:
            self.close()
            raise

    def _each(self, msgs: list[tuple[Any, ...]], timeout: float) -> list[Any]:
        """Send one message to each process first, then collect the answers: the
        processes work at the same time."""
        for fleet, msg in zip(self.fleets, msgs, strict=True):
            fleet.conn.send(msg)
        out = []
        for fleet, msg in zip(self.fleets, msgs, strict=True):
            if not fleet.conn.poll(timeout):
                raise RuntimeError(
                    f"fleet process {fleet.pid} did not answer {msg[0]!r} within {timeout:g} s"
                )
            out.append(fleet.conn.recv())
        return out

    def enroll(self, uris: list[str], concurrency: int) -> tuple[list[Identity | str], float]:
        """Redeem ``uris`` (``concurrency`` at a time over all processes); the
        identities in ``uris``' order and the wall time of the slowest process."""
        per = max(1, concurrency // len(self.fleets))
        parts = self._each(
            [("enroll", part, per) for part in _slices(uris, len(self.fleets))], 600.0
        )
        got: list[Identity | str] = []
        for done, _ in parts:
            got.extend(done)
        return got, max(took for _, took in parts)

    def connect(
        self, host: str, port: int, fingerprint: str, idents: list[Identity], quiet: bool = True
    ) -> None:
        parts = _slices(idents, len(self.fleets))
        self._each([("connect", host, port, fingerprint, p, quiet) for p in parts], 60.0)

    def status(self) -> Status:
        out: Status = {}
        for part in self._each([("status",)] * len(self.fleets), 60.0):
            out.update(part)
        return out

    def disconnect(self) -> None:
        self._each([("disconnect",)] * len(self.fleets), 120.0)

    @property
    def pids(self) -> list[int]:
        return [f.pid for f in self.fleets]

    def close(self) -> None:
        for fleet in self.fleets:
            fleet.close()
