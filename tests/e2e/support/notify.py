"""A fake systemd ``$NOTIFY_SOCKET`` for the sd_notify tests."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

from .polling import wait_for


class FakeNotify:
    """A fake systemd ``$NOTIFY_SOCKET``: a SOCK_DGRAM Unix socket collecting
    sd_notify datagrams as dicts (``{"READY": "1", "STATUS": ...}``), each with
    the monotonic time it was read at."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(
            prefix="ptn-notify-", dir="/tmp"
        )  # short: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self.received_at: list[float] = []

    def poll(self) -> list[dict[str, str]]:
        """Read every datagram queued so far; returns all messages seen."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            self.received_at.append(time.monotonic())

    def count(self, key: str, value: str = "1") -> int:
        return sum(1 for m in self.poll() if m.get(key) == value)

    def wait(
        self, key: str, value: str = "1", since: int = 0, timeout: float = 10.0
    ) -> dict[str, str]:
        return wait_for(
            lambda: next((m for m in self.poll()[since:] if m.get(key) == value), None),
            timeout,
            interval=0.002,
            what=f"{key}={value} on the notify socket (got {self.messages})",
        )

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
