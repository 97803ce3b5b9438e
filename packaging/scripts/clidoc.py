"""Render the three CLIs' click definitions as man pages and as Markdown.

The click commands are the single source: their ``--help`` text, options, defaults
and environment variables become ``portunus-server.1`` (etc.) for the packages and
``docs/reference/cli.md`` for the repository, so neither can drift from the code.

    python packaging/scripts/clidoc.py man DIR       # DIR/portunus-*.1
    python packaging/scripts/clidoc.py markdown      # docs/reference/cli.md on stdout
    python packaging/scripts/clidoc.py completion DIR  # DIR/{bash,zsh,fish}/...

Run it with the checkout's (or the staged) interpreter: it imports portunus.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from portunus import __version__

PROGRAMS = {
    "portunus-server": "portunus.cli.server:cli",
    "portunus-client": "portunus.cli.client:main",
    "portunus-standalone": "portunus.cli.standalone:main",
}

EXIT_STATUS = [
    ("0", "success"),
    ("1", "other error (including an unreachable server: unavailable)"),
    ("2", "usage or validation error (bad flag, bad value, invalid config file)"),
    ("3", "pre-flight check failed"),
    ("4", "unauthenticated (no or wrong token); portunus-client: revoked by the server"),
    ("5", "not found (rule or client)"),
    ("6", "activation failed (the port could not be bound)"),
    ("7", "acknowledgement timeout (the client did not confirm in time)"),
    ("8", "client not connected"),
    ("9", "forbidden"),
    ("10", "conflict (port in use by another rule, name taken)"),
    ("78", "serve: invalid server.toml or a database schema newer than the code"),
]


@dataclass
class Page:
    """One command (the program itself or one verb) as plain pieces."""

    path: str  # "portunus-server push-rule"
    usage: str  # "[OPTIONS] CLIENT LISTEN [TARGET]"
    help: str  # description, click's \b paragraphs kept
    options: list[tuple[str, str]]  # (flags and metavar, help with default/env)
    verbs: list[tuple[str, str]]  # (verb, short help) for a group


def load(program: str) -> click.Command:
    module, attr = PROGRAMS[program].split(":")
    return getattr(importlib.import_module(module), attr)


def pages(program: str) -> Iterator[Page]:
    """The program's page, then one per verb (sorted, hidden verbs left out)."""
    cmd = load(program)
    ctx = click.Context(cmd, info_name=program, **{"terminal_width": 80, **cmd.context_settings})
    yield _page(cmd, ctx, program)
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sub_ctx = click.Context(sub, info_name=name, parent=ctx, terminal_width=80)
            yield _page(sub, sub_ctx, f"{program} {name}")


def _page(cmd: click.Command, ctx: click.Context, path: str) -> Page:
    text = inspect.cleandoc(cmd.help or "")
    if cmd.epilog:
        text += "\n\n" + inspect.cleandoc(cmd.epilog)
    options = [rec for p in cmd.get_params(ctx) if (rec := p.get_help_record(ctx))]
    verbs: list[tuple[str, str]] = []
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                verbs.append((name, sub.get_short_help_str(limit=200)))
    return Page(path, " ".join(cmd.collect_usage_pieces(ctx)), text, options, verbs)


def paragraphs(text: str) -> Iterator[tuple[bool, str]]:
    """``(preformatted, text)`` per paragraph; click's ``\\b`` marks no-rewrap ones,
    and so does indentation (examples)."""
    for para in re.split(r"\n\s*\n", text.strip()):
        raw = para.startswith("\b")
        para = para.lstrip("\b").strip("\n")
        if not para.strip():
            continue
        lines = para.splitlines()
        yield raw or any(ln.startswith(" ") for ln in lines[1:]), para


# ------------------------------------------------------------------ roff


# Typography the help texts use, in forms every man output device has (a C locale
# renders to ASCII and warns about glyphs it lacks).
_ROFF_CHARS = {"\u2014": "\\(em", "\u2013": "\\(en", "\u2026": "...", "\u2192": "\\(->",
               "\u2018": "\\(oq", "\u2019": "\\(cq", "\u201c": "\\(lq", "\u201d": "\\(rq"}


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("\b", "")
    text = "".join(_ROFF_CHARS.get(c, c if c.isascii() else f"\\[u{ord(c):04X}]") for c in text)
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in text.splitlines())


def _flags(text: str) -> str:
    return "\\fB" + _roff(text).replace("-", "\\-") + "\\fR"


def _roff_body(text: str) -> list[str]:
    out: list[str] = []
    for pre, para in paragraphs(text):
        out += [".PP"] + ([".nf", _roff(para), ".fi"] if pre else [_roff(" ".join(para.split()))])
    return out


def man_page(program: str) -> str:
    """The whole roff page: the program, its options, then every verb."""
    top, *verbs = list(pages(program))
    summary = next(paragraphs(top.help), (False, program))[1].split("\n")[0].rstrip(".")
    out = [f'.TH {program.upper()} 1 "" "portunus {__version__}" "Portunus manual"',
           ".SH NAME", f"{program} \\- {_roff(summary)}",
           ".SH SYNOPSIS", f".B {program}", _roff(top.usage),
           ".SH DESCRIPTION", *_roff_body(top.help)]
    if top.options:
        out.append(".SH OPTIONS")
        for flags, help_ in top.options:
            out += [".TP", _flags(flags), _roff(help_)]
    if verbs:
        out.append(".SH COMMANDS")
        for page in verbs:
            verb = page.path.split(" ", 1)[1]
            out += [f'.SS "{verb}"', f".B {program} {verb}", _roff(page.usage), *_roff_body(page.help)]
            for flags, help_ in page.options:
                out += [".TP", _flags(flags), _roff(help_)]
    out.append(".SH EXIT STATUS")
    for code, meaning in EXIT_STATUS:
        out += [".TP", f"\\fB{code}\\fR", _roff(meaning)]
    others = [p for p in PROGRAMS if p != program]
    out += [".SH SEE ALSO", ", ".join(f"\\fB{p}\\fR(1)" for p in others),
            ".PP", "The reference (HTTP API, configuration keys, metrics, error codes) is in "
            "/usr/share/doc/portunus and in the docs/reference directory of the source tree."]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ markdown


def _md_text(text: str) -> str:
    """One line of prose; ``<data-dir>`` must not read as an HTML tag."""
    return " ".join(text.split()).replace("<", "\\<")


def _md_body(text: str) -> list[str]:
    out: list[str] = []
    for pre, para in paragraphs(text):
        out += (["```text", para.replace("\b", ""), "```", ""] if pre
                else [_md_text(para), ""])
    return out


def _md_options(options: list[tuple[str, str]]) -> list[str]:
    return [f"- `{flags}` — {_md_text(help_)}" for flags, help_ in options] + [""]


def markdown() -> str:
    out = ["# Command-line reference", "",
           "Generated from the click definitions by `packaging/scripts/clidoc.py markdown`",
           "(`make reference`); `--help` on any command prints the same text. The packages",
           "ship it as man pages: `man portunus-server`, `man portunus-client`,",
           "`man portunus-standalone`. Exit codes: [exit-codes.md](exit-codes.md).", ""]
    for program in PROGRAMS:
        top, *verbs = list(pages(program))
        out += [f"## {program}", "", f"Usage: `{program} {top.usage}`", "", *_md_body(top.help)]
        if top.options:
            out += ["Options:", "", *_md_options(top.options)]
        for page in verbs:
            out += [f"### {page.path}", "", f"Usage: `{page.path} {page.usage}`", "",
                    *_md_body(page.help)]
            if page.options:
                out += ["Options:", "", *_md_options(page.options)]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------ completion

# Where Debian's bash-completion, zsh and fish look for packaged completions.
COMPLETION_FILES = {
    "bash": "bash-completion/completions/{prog}",
    "zsh": "zsh/vendor-completions/_{prog}",
    "fish": "fish/vendor_completions.d/{prog}.fish",
}


def completion_script(program: str, shell: str) -> str:
    """What ``_PORTUNUS_SERVER_COMPLETE=bash_source portunus-server`` prints: a script
    that asks the installed program for completions at run time."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None, shell
    var = "_" + program.replace("-", "_").upper() + "_COMPLETE"
    return cls(load(program), {}, program, var).source()


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "man":
        out = Path(argv[1])
        out.mkdir(parents=True, exist_ok=True)
        for program in PROGRAMS:
            (out / f"{program}.1").write_text(man_page(program))
        return 0
    if len(argv) == 2 and argv[0] == "completion":
        for shell, pattern in COMPLETION_FILES.items():
            for program in PROGRAMS:
                dest = Path(argv[1]) / pattern.format(prog=program)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(completion_script(program, shell))
        return 0
    if argv == ["markdown"]:
        sys.stdout.write(markdown())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
