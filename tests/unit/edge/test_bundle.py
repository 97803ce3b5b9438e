"""The bundle file and the private JSON writer: modes, atomicity, errors that teach."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from portunus.edge.bundle import Bundle, BundleError, read_bundle, split_server, write_bundle

FP = "sha256:" + "ab" * 32


def sample() -> Bundle:
    return Bundle(
        server="127.0.0.1:7443",
        fingerprint=FP,
        client_id="01HX",
        client_name="edge-01",
        token="tok",
    )


def test_roundtrip_is_0600_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "client.json"
    old = os.umask(0)  # the mode must not depend on a friendly umask
    try:
        write_bundle(str(path), sample())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["client.json"]
    raw = json.loads(path.read_text())
    assert raw == {
        "version": 1,
        "server": "127.0.0.1:7443",
        "fingerprint": FP,
        "client_id": "01HX",
        "client_name": "edge-01",
        "token": "tok",
    }
    back = read_bundle(str(path))
    assert (back.server, back.token, back.path) == ("127.0.0.1:7443", "tok", str(path))


def test_rewrite_replaces_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "client.json"
    b = sample()
    write_bundle(str(path), b)
    b.client_name = "edge-paris"
    write_bundle(str(path), b)
    assert read_bundle(str(path)).client_name == "edge-paris"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_missing_bundle_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="portunus-client enroll"):
        read_bundle(str(tmp_path / "nope.json"))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "invalid JSON"),
        ("[1]", "expected a JSON object"),
        (json.dumps({"version": 2}), "version 2"),
        (
            json.dumps({"version": 1, "server": "h:1", "fingerprint": FP}),
            "lacks client_id, client_name, token",
        ),
        (
            json.dumps(
                {
                    "version": 1,
                    "server": "h:1",
                    "fingerprint": "sha256:AB",
                    "client_id": "a",
                    "client_name": "b",
                    "token": "c",
                }
            ),
            "64 lowercase hex",
        ),
        (
            json.dumps(
                {
                    "version": 1,
                    "server": "nohostport",
                    "fingerprint": FP,
                    "client_id": "a",
                    "client_name": "b",
                    "token": "c",
                }
            ),
            "not HOST:PORT",
        ),
    ],
)
def test_malformed_bundles_are_refused_with_the_reason(
    tmp_path: Path, content: str, needle: str
) -> None:
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(BundleError, match=needle) as info:
        read_bundle(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:7443", ("127.0.0.1", 7443)),
        ("edge.example:1", ("edge.example", 1)),
        ("[::1]:7443", ("::1", 7443)),
    ],
)
def test_split_server(text: str, want: tuple[str, int]) -> None:
    assert split_server(text) == want


@pytest.mark.parametrize(
    "text", ["::1:7443", "host:", ":80", "host:0", "host:70000", "[::1]7443", "host:x"]
)
def test_split_server_refuses(text: str) -> None:
    with pytest.raises(BundleError):
        split_server(text)
