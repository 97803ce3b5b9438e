"""A continuous echo loop through a forwarded port, for tests that kill a process
of the tree and must show forwarding never stopped.

Each thread connects, sends one line, expects it back and closes, over and over.
Failures are sorted by where they happen: a failed *connect* (refused, timed out)
means the port stopped accepting; a reset after the connect is a connection that
was in flight on a process that died.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from tests.e2e.support import LOOPBACK, recv_exact, wait_for


@dataclass
class LoopStats:
    ok: int = 0
    ok_after_mark: int = 0
    connect_failures: list[str] = field(default_factory=list)
    resets: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return len(self.connect_failures) + len(self.resets) + len(self.other)


class EchoLoop:
    """``threads`` workers echoing one line per connection through ``port``."""

    def __init__(self, port: int, threads: int = 2, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.stats = LoopStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._marked = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def __enter__(self) -> EchoLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoopStats:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        return self.stats

    def mark(self) -> None:
        """From now on successes also count in ``ok_after_mark``."""
        self._marked.set()

    def wait_ok(self, n: int, timeout: float = 10.0, after_mark: bool = False) -> None:
        def enough() -> bool:
            return (self.stats.ok_after_mark if after_mark else self.stats.ok) >= n

        wait_for(
            enough, timeout, what=lambda: f"{n} echoes through port {self.port} ({self.stats})"
        )

    def _run(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            line = f"loop {n} line {i}\n".encode()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                try:
                    s.connect((LOOPBACK, self.port))
                except OSError as exc:
                    with self._lock:
                        self.stats.connect_failures.append(f"{time.monotonic():.3f} {exc!r}")
                    continue
                try:
                    s.sendall(line)
                    got = recv_exact(s, len(line))
                except (ConnectionResetError, BrokenPipeError, EOFError) as exc:
                    with self._lock:
                        self.stats.resets.append(f"{time.monotonic():.3f} {exc!r}")
                    continue
                except OSError as exc:  # a timeout: the relay stalled
                    with self._lock:
                        self.stats.other.append(f"{time.monotonic():.3f} {exc!r}")
                    continue
                with self._lock:
                    if got == line:
                        self.stats.ok += 1
                        if self._marked.is_set():
                            self.stats.ok_after_mark += 1
                    else:
                        self.stats.other.append(f"mismatch {got!r} != {line!r}")
            finally:
                s.close()
