"""Enrollment: URI parsing, the exchange against a fake gateway, and the CLI verb."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from portunus.cli.client import main
from portunus.edge.enroll import EnrollError, parse_enroll_uri, redeem
from portunus.edge.pinning import FingerprintMismatch

from .fake_server import FakeEdgeServer, ThreadedFakeServer

FP = "sha256:" + "0123456789abcdef" * 4


def test_parse_uri() -> None:
    t = parse_enroll_uri(f"portunus://10.0.0.1:7443/enroll?code=abc-_x&fp={FP}")
    assert (t.host, t.port, t.code, t.fingerprint, t.server) == (
        "10.0.0.1",
        7443,
        "abc-_x",
        FP,
        "10.0.0.1:7443",
    )
    v6 = parse_enroll_uri(
        f"portunus://[::1]:7443/enroll?code=c&fp={FP.upper().replace('SHA256', 'sha256')}"
    )
    assert (v6.host, v6.server, v6.fingerprint) == ("::1", "[::1]:7443", FP)


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        (f"https://h:1/enroll?code=c&fp={FP}", "portunus://"),
        (f"portunus://h/enroll?code=c&fp={FP}", "HOST:PORT"),
        (f"portunus://h:99999/enroll?code=c&fp={FP}", "port"),
        (f"portunus://h:1/join?code=c&fp={FP}", "/enroll"),
        (f"portunus://h:1/enroll?fp={FP}", "no code="),
        ("portunus://h:1/enroll?code=c", "unquoted '&'"),
        ("portunus://h:1/enroll?code=c&fp=sha256:1234", "64 hex"),
        ("portunus://h:1/enroll?code=c&fp=md5:" + "0" * 64, "64 hex"),
    ],
)
def test_parse_uri_refuses(uri: str, needle: str) -> None:
    with pytest.raises(EnrollError, match=needle) as info:
        parse_enroll_uri(uri)
    assert info.value.code == "bad_uri"


async def test_redeem_gets_a_bundle_and_the_code_works_once(fake: FakeEdgeServer) -> None:
    code = fake.mint("01HEDGE", "edge-01")
    bundle = await redeem(parse_enroll_uri(fake.uri(code)))
    assert (bundle.client_id, bundle.client_name, bundle.token) == (
        "01HEDGE",
        "edge-01",
        "token-01HEDGE",
    )
    assert bundle.server == f"127.0.0.1:{fake.port}" and bundle.fingerprint == fake.fingerprint
    assert fake.enroll_frames[0]["code"] == code and fake.enroll_frames[0]["version"]
    with pytest.raises(EnrollError, match="already used") as info:
        await redeem(parse_enroll_uri(fake.uri(code)))
    assert info.value.code == "enrollment_invalid"


async def test_expired_code_is_refused(fake: FakeEdgeServer) -> None:
    code = fake.mint("01HEDGE", "edge-01", ttl=-1)
    with pytest.raises(EnrollError, match="expired"):
        await redeem(parse_enroll_uri(fake.uri(code)))


async def test_tampered_fingerprint_sends_nothing(fake: FakeEdgeServer) -> None:
    code = fake.mint("01HEDGE", "edge-01")
    with pytest.raises(FingerprintMismatch) as info:
        await redeem(parse_enroll_uri(fake.uri(code, FP)))
    assert info.value.expected == FP and info.value.got == fake.fingerprint
    assert FP in str(info.value) and fake.fingerprint in str(info.value)
    await fake.wait(lambda: fake.connections == 1)
    assert fake.enroll_frames == [] and fake.used == set()
    # The code is still good with the right pin.
    assert (await redeem(parse_enroll_uri(fake.uri(code)))).client_id == "01HEDGE"


async def test_unreachable_server(fake: FakeEdgeServer) -> None:
    port = fake.port
    await fake.stop()
    with pytest.raises(EnrollError, match="cannot reach") as info:
        await redeem(
            parse_enroll_uri(f"portunus://127.0.0.1:{port}/enroll?code=c&fp={FP}"), timeout=2
        )
    assert info.value.code == "unavailable"


# ------------------------------------------------------------------ the CLI verb


@pytest.fixture
def threaded(cert: tuple[Path, Path, str]) -> Iterator[ThreadedFakeServer]:
    t = ThreadedFakeServer(*cert)
    t.call(t.server.start())
    yield t
    t.close()


def test_cli_enroll_writes_a_private_bundle(threaded: ThreadedFakeServer, tmp_path: Path) -> None:
    code = threaded.call_fn(lambda: threaded.server.mint("01HEDGE", "edge-01"))
    out = tmp_path / "etc" / "client.json"
    res = CliRunner().invoke(main, ["enroll", threaded.server.uri(code), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert json.loads(out.read_text())["token"] == "token-01HEDGE"
    assert "enrolled as edge-01 (client id 01HEDGE)" in res.output
    assert f"portunus-client --bundle {out}" in res.output
    # A second run refuses to overwrite, before burning anything.
    code2 = threaded.call_fn(lambda: threaded.server.mint("01HEDGE", "edge-01"))
    res = CliRunner().invoke(main, ["enroll", threaded.server.uri(code2), "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    assert code2 not in threaded.server.used


def test_cli_enroll_fingerprint_mismatch_names_both(
    threaded: ThreadedFakeServer, tmp_path: Path
) -> None:
    code = threaded.call_fn(lambda: threaded.server.mint("01HEDGE", "edge-01"))
    out = tmp_path / "client.json"
    res = CliRunner().invoke(main, ["enroll", threaded.server.uri(code, FP), "--out", str(out)])
    assert res.exit_code == 1
    assert f"expected {FP}" in res.output and f"got {threaded.server.fingerprint}" in res.output
    assert not out.exists()


def test_cli_enroll_used_code(threaded: ThreadedFakeServer, tmp_path: Path) -> None:
    code = threaded.call_fn(lambda: threaded.server.mint("01HEDGE", "edge-01"))
    threaded.call_fn(lambda: threaded.server.used.add(code))
    res = CliRunner().invoke(
        main, ["enroll", threaded.server.uri(code), "--out", str(tmp_path / "c.json")]
    )
    assert res.exit_code == 1
    assert "enrollment_invalid" in res.output and "already used" in res.output
    assert "enroll-client" in res.output  # the hint says how to get a new code


def test_cli_enroll_bad_uri_is_usage(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["enroll", "portunus://h:1/enroll?code=c", "--out", str(tmp_path / "c.json")]
    )
    assert res.exit_code == 2 and "single quotes" in res.output


def test_cli_run_without_bundle_teaches(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 2 and "--bundle FILE" in res.output and "enroll" in res.output
    res = CliRunner().invoke(
        main, ["--bundle", str(tmp_path / "none.json"), "--data-dir", str(tmp_path)]
    )
    assert res.exit_code == 2 and "portunus-client enroll" in res.output
