"""The client bundle (what ``portunus-client enroll`` writes) and private JSON files.

The bundle holds the long-lived client token, so it is written like a key: mode
0600 from the first byte (``O_CREAT`` with the mode, never chmod afterwards), to
a temp file in the same directory, fsynced, then renamed over the target — a
crash leaves either the old bundle or the new one, never half of one.  The same
writer keeps ``rules.json`` (the last rule set the server sent).

Format (docs/edge.md): ``{"version": 1, "server": "HOST:PORT", "fingerprint":
"sha256:HEX", "client_id", "client_name", "token"}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from portunus.fsutil import write_private_json
from portunus.text import is_ascii_digits

BUNDLE_VERSION = 1
FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
_FIELDS = ("server", "fingerprint", "client_id", "client_name", "token")


class BundleError(Exception):
    """The bundle is missing, unreadable or malformed; the message says which and what to do."""


@dataclass
class Bundle:
    server: str  # "HOST:PORT" of the server's control_listen
    fingerprint: str  # "sha256:<64 lowercase hex>" of the server certificate (DER)
    client_id: str
    client_name: str
    token: str
    path: str | None = None  # where it was read from / written to (not serialized)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": BUNDLE_VERSION,
            "server": self.server,
            "fingerprint": self.fingerprint,
            "client_id": self.client_id,
            "client_name": self.client_name,
            "token": self.token,
        }

    def host_port(self) -> tuple[str, int]:
        """The server address, split; raises BundleError when ``server`` is not HOST:PORT."""
        return split_server(self.server)


def split_server(text: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port)."""
    s = text.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1 : end + 2] != ":":
            raise BundleError(f"server {text!r} is not [IPv6]:PORT")
        host, port = s[1:end], s[end + 2 :]
    else:
        host, sep, port = s.rpartition(":")
        if not sep or ":" in host:
            raise BundleError(f"server {text!r} is not HOST:PORT (IPv6 goes in brackets)")
    if not host or not is_ascii_digits(port):
        raise BundleError(f"server {text!r} is not HOST:PORT")
    if not 0 < int(port) < 65536:
        raise BundleError(f"server {text!r}: port must be 1-65535")
    return host, int(port)


def read_bundle(path: str) -> Bundle:
    """Load and check a bundle; every problem is a BundleError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise BundleError(
            f"{path}: no such bundle; create it with: portunus-client enroll 'portunus://…' --out {path}"
        ) from None
    except PermissionError:
        raise BundleError(
            f"{path}: permission denied (the bundle is mode 0600; run as its owner)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read: {exc}") from None
    except ValueError as exc:
        raise BundleError(f"{path}: not a bundle (invalid JSON: {exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: not a bundle (expected a JSON object)")
    if raw.get("version") != BUNDLE_VERSION:
        raise BundleError(
            f"{path}: bundle version {raw.get('version')!r} is not supported (expected 1)"
        )
    missing = [k for k in _FIELDS if not isinstance(raw.get(k), str) or not raw.get(k)]
    if missing:
        raise BundleError(f"{path}: bundle lacks {', '.join(missing)}; enroll again")
    if not FINGERPRINT_RE.fullmatch(raw["fingerprint"]):
        raise BundleError(
            f"{path}: fingerprint {raw['fingerprint']!r} is not sha256:<64 lowercase hex>"
        )
    bundle = Bundle(**{k: raw[k] for k in _FIELDS}, path=path)
    try:
        bundle.host_port()
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    return bundle


def write_bundle(path: str, bundle: Bundle) -> None:
    write_private_json(path, bundle.to_json())
    bundle.path = path
