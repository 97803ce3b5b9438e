"""Man pages, shell completion and docs/reference/cli.md come from the click
commands (packaging/scripts/clidoc.py): the committed cli.md is what the code says,
the man pages render cleanly and list every verb, completion completes."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


@functools.cache
def _clidoc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("clidoc", REPO / "packaging/scripts/clidoc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["clidoc"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_the_code() -> None:
    committed = (REPO / "docs/reference/cli.md").read_text()
    assert committed == _clidoc().markdown(), (
        "docs/reference/cli.md is stale: run `make reference` and commit it"
    )


def test_every_verb_is_in_the_reference() -> None:
    clidoc = _clidoc()
    text = (REPO / "docs/reference/cli.md").read_text()
    for program in clidoc.PROGRAMS:
        for page in clidoc.pages(program):
            assert f"Usage: `{page.path} " in text, page.path


@pytest.mark.parametrize("program", ["portunus-server", "portunus-client", "portunus-standalone"])
def test_man_page_renders_without_warnings(program: str, tmp_path: Path) -> None:
    clidoc = _clidoc()
    assert clidoc.main(["man", str(tmp_path)]) == 0
    page = tmp_path / f"{program}.1"
    roff = page.read_text()
    assert roff.startswith(f".TH {program.upper()} 1 ")
    verbs = [p.path.split(" ", 1)[1] for p in list(clidoc.pages(program))[1:]]
    for verb in verbs:
        assert f'.SS "{verb}"' in roff, verb
    if shutil.which("man") is None:
        pytest.skip("man is not installed: the page was generated but not rendered")
    res = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"], "MANWIDTH": "100"},
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "EXIT STATUS" in res.stdout and "OPTIONS" in res.stdout
    for verb in verbs:
        assert f"{program} {verb}" in res.stdout, verb


@pytest.mark.parametrize(
    ("program", "words", "expected"),
    [
        ("portunus-server", "portunus-server push-r", "plain,push-rule"),
        ("portunus-server", "portunus-server list-rules --for", "plain,--format"),
        ("portunus-standalone", "portunus-standalone sta", "plain,stats"),
        ("portunus-client", "portunus-client enr", "plain,enroll"),
    ],
)
def test_bash_completion_completes(program: str, words: str, expected: str) -> None:
    """What the packaged completion script runs: the program itself, with the
    _<PROG>_COMPLETE=bash_complete protocol."""
    var = "_" + program.replace("-", "_").upper() + "_COMPLETE"
    env = {
        **os.environ,
        var: "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    res = subprocess.run([str(BIN / program)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [expected]


def test_completion_files_for_every_shell(tmp_path: Path) -> None:
    clidoc = _clidoc()
    assert clidoc.main(["completion", str(tmp_path)]) == 0
    for pattern in clidoc.COMPLETION_FILES.values():
        for program in clidoc.PROGRAMS:
            text = (tmp_path / pattern.format(prog=program)).read_text()
            assert program.replace("-", "_").upper() + "_COMPLETE" in text
