"""``portunus-standalone --check``: exit 0 for a valid file; exit 2 listing every
error as ``file:line: message`` with the line of the offending key (of the
``[[rule]]`` header when a key is missing)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.e2e.support import STANDALONE_BIN

VALID = """\
listen_address = "127.0.0.1"
metrics_listen = "127.0.0.1:7081"
shutdown_drain_timeout_secs = 3

[[rule]]
name = "web"
listen_port = 20001
target = "127.0.0.1:80"

[[rule]]
name = "range"
listen_ports = "20010-20019"
targets = [{ host = "127.0.0.1", port = 30000, port_end = 30009, priority = 1 },
           { host = "localhost", ports = "31000-31009", priority = 2 }]
"""

# Line numbers matter: the expected errors below point at them.
INVALID = """\
listen_address = "127.0.0.1"
metrics_listen = "127.0.0.1:7081"
bogus_setting = 1

[[rule]]
name = "unknown-key"
listen_port = 20001
target = "127.0.0.1:80"
colour = "blue"

[[rule]]
name = "bad-port"
listen_port = 70000
target = "127.0.0.1:80"

[[rule]]
name = "no-target"
listen_port = 20003

[[rule]]
name = "mismatch"
listen_ports = "20010-20019"
target = "127.0.0.1:30000-30004"

[[rule]]
name = "sni-udp"
protocol = "udp"
listen_port = 20020
target = "127.0.0.1:53"
sni = "a.example.com"

[[rule]]
name = "dup"
listen_port = 20030
target = "127.0.0.1:80"

[[rule]]
name = "dup"
listen_port = 20031
target = "127.0.0.1:80"

[[rule]]
name = "overlap"
listen_port = 20030
target = "127.0.0.1:81"
"""

EXPECTED = {  # line -> what the message must say
    3: "unknown key 'bogus_setting'",
    9: "unknown key 'colour'",
    13: "70000",
    16: "target",
    23: "range_length_mismatch",
    30: "sni_on_unsupported_rule",
    38: "duplicate rule name 'dup'",
    44: "port_conflict",
}

SYNTAX = """\
listen_address = "127.0.0.1"

[[rule]]
name = "x"
listen_port = = 5
target = "127.0.0.1:80"
"""


def run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STANDALONE_BIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_check_valid_file_exits_0(tmp_path: Path) -> None:
    path = write(tmp_path, "ok.toml", VALID)
    res = run(["--check", "--config", path])
    assert res.returncode == 0, res.stderr
    assert f"{path}: ok (2 rule(s))" in res.stdout
    assert res.stderr == ""


def test_check_reports_every_error_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.toml", INVALID)
    res = run(["--check", "--config", path])
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [
        ln
        for ln in res.stderr.splitlines()
        if ln.startswith(f"{path}:") and re.match(r"\d+:", ln[len(path) + 1 :])
    ]
    by_line: dict[int, list[str]] = {}
    for ln in errors:
        num, _, msg = ln[len(path) + 1 :].partition(": ")
        by_line.setdefault(int(num), []).append(msg)
    assert sorted(by_line) == sorted(EXPECTED), f"error lines {sorted(by_line)}:\n{res.stderr}"
    for line, needle in EXPECTED.items():
        assert len(by_line[line]) == 1, f"line {line}: {by_line[line]}"
        assert needle in by_line[line][0], (
            f"line {line}: {by_line[line][0]!r} should mention {needle!r}"
        )
    assert f"{path}: {len(EXPECTED)} error(s); nothing started" in res.stderr


def test_check_toml_syntax_error_has_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "syntax.toml", SYNTAX)
    res = run(["--check", "--config", path])
    assert res.returncode == 2, res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"{path}:5: TOML syntax error"), first


def test_check_missing_file_exits_2(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    res = run(["--check", "--config", path])
    assert res.returncode == 2
    assert res.stderr.startswith(f"{path}: cannot read")


def test_run_with_invalid_file_starts_nothing(tmp_path: Path) -> None:
    """Without --check an invalid file is refused the same way (exit 2) instead of
    starting a partial rule set."""
    path = write(tmp_path, "bad.toml", INVALID)
    res = run(["--config", path, "--shards", "1"])
    assert res.returncode == 2
    assert "nothing started" in res.stderr
    assert "supervisor.ready" not in res.stderr


def test_check_non_ascii_digits_are_an_error_not_a_crash(tmp_path: Path) -> None:
    path = write(
        tmp_path, "sup.toml", '[[rule]]\nname = "x"\nlisten_ports = "²"\ntarget = "127.0.0.1:80"\n'
    )
    res = run(["--check", "--config", path])
    assert "Traceback" not in res.stderr
    assert res.returncode == 2
    assert res.stderr.startswith(f"{path}:3: ")
