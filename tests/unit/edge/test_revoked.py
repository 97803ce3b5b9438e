"""The revoked marker: written for one client, read back only for that client, and
explained with a bundle path the operator can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from portunus.edge import revoked
from portunus.edge.bundle import Bundle


def _bundle() -> Bundle:
    return Bundle(
        server="127.0.0.1:7443",
        fingerprint="sha256:" + "a" * 64,
        client_id="01HCLIENT",
        client_name="edge-01",
        token="t",
    )


def test_marker_round_trip_is_private_and_per_client(tmp_path: Path) -> None:
    revoked.write_marker(str(tmp_path), _bundle(), "revoked by ops")
    path = Path(revoked.marker_path(str(tmp_path)))
    assert path.stat().st_mode & 0o777 == 0o600
    marker = revoked.read_marker(str(tmp_path), "01HCLIENT")
    assert marker is not None and marker["message"] == "revoked by ops"
    assert revoked.read_marker(str(tmp_path), "01HOTHER") is None


def test_describe_names_the_bundle_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    text = revoked.describe({"client_name": "edge-01", "client_id": "01HCLIENT"}, "/etc/x.bundle")
    assert "--out /etc/x.bundle" in text and "enroll-client" in text


def test_describe_under_systemd_points_at_the_loaded_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    text = revoked.describe({"client_id": "01HCLIENT"}, str(tmp_path / "client.bundle"))
    assert str(tmp_path) not in text
    assert "/etc/portunus/client.bundle" in text
