"""Shared machinery for end-to-end tests that run the real Portunus processes.

Everything here binds 127.0.0.1 only.  The modules, all re-exported here so tests
import ``from tests.e2e.support import ...``:

- ``polling``: ``wait_for`` polls a condition instead of sleeping blindly.
- ``ports``: ``PortAllocator`` hands out listener ports that no other test (in this
  session or a concurrent one on the same machine) is handed, taken from below the
  kernel's ephemeral range so client source ports never collide with them.
- ``streams``: ``Pattern`` / ``Digest`` (reproducible payloads and their checksums)
  and blocking client socket helpers.
- ``origins``: ``Origin``, a TCP origin server in background threads with pluggable
  per-connection handlers (``echo``, ``sink``, ``source``, ``duplex``, ...); every
  connection's byte counts and SHA-256 are recorded.
- ``metrics``: ``Metrics`` / ``scrape``, a Prometheus scrape summed by name and
  label subset.
- ``procs``: ``ManagedProc``, a process started in its own session with stderr
  captured to a file, JSON log parsing, children by process title, and a teardown
  that kills the whole process group; ``ProcFactory``, what the fixtures that
  start them share; ``clean_env``, the environment they start with.
- ``standalone`` / ``server``: ``StandaloneProc`` (TOML file and reload) and
  ``ServerProc`` (data dir, CLI, API, control socket), each with its factory.
- ``notify``: ``FakeNotify``, a fake systemd ``$NOTIFY_SOCKET``.
- ``secrets``: ``WATCH``, the secrets the tests met and the logs scanned for them.
"""

from __future__ import annotations

from .metrics import Metrics, multiproc_value, scrape
from .notify import FakeNotify
from .origins import (
    REQUEST,
    ConnRecord,
    Handler,
    Origin,
    OriginFactory,
    client_duplex,
    duplex,
    duplex_on_request,
    echo,
    exchange,
    push_forever,
    request_header,
    sink,
    slow_source,
    source,
)
from .polling import wait_for
from .ports import LOOPBACK, PortAllocator, connection_refused, listening_ports
from .procs import VENV_BIN, ManagedProc, ProcFactory, clean_env, pipe_fds, title_of
from .secrets import WATCH, SecretWatch
from .server import OPERATOR_TOKEN, SERVER_BIN, ApiResponse, CliResult, ServerFactory, ServerProc
from .standalone import STANDALONE_BIN, StandaloneFactory, StandaloneProc
from .streams import (
    Digest,
    KiB,
    MiB,
    Pattern,
    connect,
    echo_roundtrip,
    recv_all,
    recv_exact,
    send_pattern,
)
from .toml_writer import standalone_toml, toml_value

__all__ = [
    "LOOPBACK",
    "OPERATOR_TOKEN",
    "REQUEST",
    "SERVER_BIN",
    "STANDALONE_BIN",
    "VENV_BIN",
    "WATCH",
    "ApiResponse",
    "CliResult",
    "ConnRecord",
    "Digest",
    "FakeNotify",
    "Handler",
    "KiB",
    "ManagedProc",
    "Metrics",
    "MiB",
    "Origin",
    "OriginFactory",
    "Pattern",
    "PortAllocator",
    "ProcFactory",
    "SecretWatch",
    "ServerFactory",
    "ServerProc",
    "StandaloneFactory",
    "StandaloneProc",
    "clean_env",
    "client_duplex",
    "connect",
    "connection_refused",
    "duplex",
    "duplex_on_request",
    "echo",
    "echo_roundtrip",
    "exchange",
    "listening_ports",
    "multiproc_value",
    "pipe_fds",
    "push_forever",
    "recv_all",
    "recv_exact",
    "request_header",
    "scrape",
    "send_pattern",
    "sink",
    "slow_source",
    "source",
    "standalone_toml",
    "title_of",
    "toml_value",
    "wait_for",
]
