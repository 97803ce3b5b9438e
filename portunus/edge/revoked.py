"""The revoked marker: ``<data-dir>/revoked.json``.

When the server answers ``error: revoked`` the link child writes this file and
halts the client; the ``portunus-client`` process reads it to say why it exits,
and refuses to start again with the same bundle (the token will never work
again, and the cached rules were already deleted).  A new enrollment brings a new
``client_id``, which the marker does not match.
"""

from __future__ import annotations

import json
import os
import time

from portunus.edge.bundle import Bundle
from portunus.fsutil import write_private_json

MARKER_FILE = "revoked.json"


def marker_path(data_dir: str) -> str:
    return os.path.join(data_dir, MARKER_FILE)


def write_marker(data_dir: str, bundle: Bundle, message: str) -> None:
    write_private_json(
        marker_path(data_dir),
        {
            "client_id": bundle.client_id,
            "client_name": bundle.client_name,
            "server": bundle.server,
            "message": message,
            "revoked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def read_marker(data_dir: str, client_id: str) -> dict[str, str] | None:
    """The marker for ``client_id``, or None (no marker, or one for another client)."""
    try:
        with open(marker_path(data_dir), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("client_id") != client_id:
        return None
    return {k: str(v) for k, v in raw.items()}


def describe(marker: dict[str, str], bundle_path: str) -> str:
    """The operator-facing explanation printed when the client stops or refuses to start."""
    why = marker.get("message") or "revoked"
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and os.path.dirname(os.path.abspath(bundle_path)) == os.path.abspath(creds):
        # Under systemd the path we see is the credential copy in /run; the operator
        # must write the file the unit loads it from.
        bundle_path = (
            "<the bundle file of LoadCredential= in portunus-client.service, "
            "by default /etc/portunus/client.bundle>"
        )
    return (
        f"this client ({marker.get('client_name', '?')}, id {marker.get('client_id', '?')}) was "
        f"revoked by the server {marker.get('server', '?')} at {marker.get('revoked_at', '?')}: {why}. "
        f"Its token no longer works. To bring it back, mint a new code on the server "
        f"(portunus-server enroll-client NAME) and run: portunus-client enroll '<uri>' "
        f"--out {bundle_path} --force"
    )
