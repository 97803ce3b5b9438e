"""Waiting for a socket to become readable in unit tests, without select().

A full run reserves loopback ports for the whole session (tests/e2e/support/ports.py
keeps one lock socket per port), so unit tests that run after the e2e ones see fds
above 1023, which select() cannot take.  poll() has no such limit."""

from __future__ import annotations

import select
import socket


def readable(sock: socket.socket | int, timeout: float = 0) -> bool:
    """``sock`` has data (or EOF) to read within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))
