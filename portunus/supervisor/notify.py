"""sd_notify spoken natively: one datagram to $NOTIFY_SOCKET, no libsystemd."""

from __future__ import annotations

import os
import socket

from portunus.text import is_ascii_digits


class Notifier:
    """Sends READY=1 / STATUS= / STOPPING=1 / WATCHDOG=1 when run under systemd."""

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self.addr = addr or None
        usec = os.environ.get("WATCHDOG_USEC", "")
        wpid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if is_ascii_digits(usec) and (not wpid or wpid == str(os.getpid())):
            # Ping at half the deadline, as sd_watchdog_enabled(3) advises.
            self.watchdog_interval = int(usec) / 2_000_000
        self.sock: socket.socket | None = None

    def send(self, *lines: str) -> None:
        if not self.addr:
            return
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.sendto("\n".join(lines).encode(), self.addr)
        except OSError:
            pass  # systemd gone or socket unwritable: nothing useful to do

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
