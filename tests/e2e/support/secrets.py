"""Secrets must never reach a log: every e2e test ends with a scan of every log
line its processes wrote for every secret the test came to know.

``WATCH`` is session-wide.  Secrets are noted where the tests meet them: the
operator token (``ServerProc.token``), enrollment codes (``code=…`` in an
enrollment URI printed by the CLI or answered by the API), client tokens (a
bundle's ``token``, ``"token": "…"`` in an answer).  Log files are registered by
``ManagedProc.start``.  ``harvest(text)`` notes what it recognises in any text, so
a new kind of secret (passwords, setup codes) needs one more pattern or one
``WATCH.note(secret)`` call.  The scan reads each file once: new bytes are checked
for every secret, and a file is re-read whole only for secrets noted since.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

MIN_LEN = 16  # shorter strings would match by accident; every Portunus secret is longer
_PATTERNS = (
    re.compile(r"[?&]code=([A-Za-z0-9_\-]{16,})"),
    re.compile(r'"(?:token|code|password|setup_code)"\s*:\s*"([^"\\]{16,})"'),
)


# An error envelope's ``"code": "cannot_remove_self"`` is not a secret: error codes
# are lowercase words with ``_`` and ``.``; a random secret of 16+ URL-safe base64
# characters without any digit or capital is a one-in-a-million draw.
_ERROR_CODE = re.compile(r"[a-z][a-z_.]*")


@dataclass
class _File:
    path: Path
    offset: int = 0
    newlines: int = 0  # line breaks before ``offset``
    secrets_seen: int = 0  # how many of WATCH.secrets the whole file was checked for


@dataclass
class SecretWatch:
    secrets: list[str] = field(default_factory=list)
    files: dict[Path, _File] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, secret: str | None) -> None:
        if secret and len(secret) >= MIN_LEN:
            with self.lock:
                if secret not in self.secrets:
                    self.secrets.append(secret)

    def harvest(self, text: str | bytes | None) -> None:
        """Note every secret recognised in ``text`` (CLI output, an API answer)."""
        if not text:
            return
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        for pattern in _PATTERNS:
            for m in pattern.finditer(text):
                if not _ERROR_CODE.fullmatch(m.group(1)):
                    self.note(m.group(1))

    def watch(self, path: Path) -> None:
        with self.lock:
            self.files.setdefault(Path(path), _File(Path(path)))

    def scan(self) -> list[str]:
        """``path:line: <what>`` for every secret found in a log."""
        with self.lock:
            secrets = list(self.secrets)
            files = list(self.files.values())
        found: list[str] = []
        for f in files:
            new_secrets = secrets[f.secrets_seen :]
            old_secrets = secrets[: f.secrets_seen]
            try:
                size = f.path.stat().st_size
                if not new_secrets and size <= f.offset:
                    continue  # nothing new to look at
                base = 0 if new_secrets else f.offset
                with f.path.open("rb") as fh:
                    fh.seek(base)
                    data = fh.read()
            except FileNotFoundError:
                continue
            checks = [(0, s) for s in new_secrets] + [
                (max(f.offset - base, 0), s) for s in old_secrets
            ]
            for start, secret in checks:
                at = data.find(secret.encode(), start)
                if at >= 0:
                    line = (f.newlines if base else 0) + data.count(b"\n", 0, at) + 1
                    found.append(
                        f"{f.path}:{line}: contains a secret ({secret[:4]}…, {len(secret)} chars)"
                    )
            # Resume at the last complete line: a secret is never split by the offset.
            end = data.rfind(b"\n") + 1
            f.newlines = (f.newlines if base else 0) + data.count(b"\n", 0, end)
            f.offset = base + end
            f.secrets_seen = len(secrets)
        return found


WATCH = SecretWatch()
