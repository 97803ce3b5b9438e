"""``portunus-client`` run mode: everything it refuses before starting a process tree."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from portunus.cli.client import main
from portunus.edge import revoked
from portunus.edge.bundle import Bundle, write_bundle

FP = "sha256:" + "cd" * 32


def _bundle(tmp_path: Path, client_id: str = "01HREVOKED") -> Path:
    path = tmp_path / "client.json"
    write_bundle(
        str(path),
        Bundle(
            server="127.0.0.1:1",
            fingerprint=FP,
            client_id=client_id,
            client_name="edge-01",
            token="t",
        ),
    )
    return path


def test_a_revoked_client_refuses_to_start(tmp_path: Path) -> None:
    path = _bundle(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    revoked.write_marker(
        str(data),
        Bundle(
            server="127.0.0.1:1",
            fingerprint=FP,
            client_id="01HREVOKED",
            client_name="edge-01",
            token="t",
        ),
        "revoked by the operator",
    )
    res = CliRunner().invoke(main, ["--bundle", str(path), "--data-dir", str(data)])
    assert res.exit_code == 4
    assert "revoked" in res.output and f"--out {path} --force" in res.output


def test_a_marker_for_another_client_does_not_block(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    revoked.write_marker(
        str(data),
        Bundle(server="h:1", fingerprint=FP, client_id="01HOLD", client_name="old", token="t"),
        "revoked",
    )
    assert revoked.read_marker(str(data), "01HNEW") is None
    assert revoked.read_marker(str(data), "01HOLD") is not None


def test_bad_addresses_are_usage_errors(tmp_path: Path) -> None:
    path = _bundle(tmp_path)
    for args in (["--metrics-listen", "nope"], ["--listen-address", "not an address!"]):
        res = CliRunner().invoke(
            main, ["--bundle", str(path), "--data-dir", str(tmp_path / "d"), *args]
        )
        assert res.exit_code == 2, res.output


def test_unknown_capability_is_a_usage_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["--bundle", str(_bundle(tmp_path)), "--disable-capability", "teleport"]
    )
    assert res.exit_code == 2 and "teleport" in res.output
