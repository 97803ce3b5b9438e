"""docs/rpc.md's message tables are generated from the classes in portunus/ipc
(packaging/scripts/ipcdoc.py): the committed tables are what the code says, every
class is documented under who sends it, and the doc names no kind or field that
does not exist."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
import typing
from pathlib import Path
from types import ModuleType

import msgspec
import pytest

from portunus.ipc import edge_messages, messages

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs/rpc.md"


@functools.cache
def _ipcdoc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ipcdoc", REPO / "packaging/scripts/ipcdoc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ipcdoc"] = module
    spec.loader.exec_module(module)
    return module


SECTIONS = {"Supervisor channel messages": messages, "Edge link frames": edge_messages}


def _documented() -> dict[tuple[str, str], set[str]]:
    """``{(section, kind): field names}`` as the committed doc's generated tables list
    them (one kind may appear under several directions, always with the same fields)."""
    block = _ipcdoc().documented(DOC.read_text())
    out: dict[tuple[str, str], set[str]] = {}
    for part in block.split("\n### ")[1:]:
        section = part.split("\n", 1)[0]
        assert section in SECTIONS, section
        for kind, fields in re.findall(r"^\| `([a-z_]+)` \| (.*?) \| ", part, re.MULTILINE):
            names = set(re.findall(r"`([a-z_]+)\??: ", fields))
            key = (section, kind)
            assert out.get(key, names) == names, f"{key} is listed with different fields"
            out[key] = names
    return out


def _classes() -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for section, module in SECTIONS.items():
        for classes in module.DIRECTIONS.values():
            for cls in classes:
                out[(section, str(cls.__struct_config__.tag))] = set(cls.__struct_fields__)
    return out


def test_message_tables_match_the_classes() -> None:
    assert _ipcdoc().documented(DOC.read_text()) == _ipcdoc().markdown(), (
        "docs/rpc.md's message tables are stale: run `make reference` and commit it"
    )


def test_the_doc_lists_every_kind_and_field_and_no_other() -> None:
    doc, code = _documented(), _classes()
    assert set(doc) == set(code), (
        f"kinds only in the doc: {sorted(set(doc) - set(code))}; "
        f"only in the code: {sorted(set(code) - set(doc))}"
    )
    for kind in code:
        assert doc[kind] == code[kind], (
            f"{kind}: doc {sorted(doc[kind])}, code {sorted(code[kind])}"
        )


@pytest.mark.parametrize(
    ("union", "directions"),
    [
        (messages.AnyMessage, messages.DIRECTIONS),
        (edge_messages.AnyFrame, edge_messages.DIRECTIONS),
    ],
)
def test_every_decodable_kind_has_a_sender_and_every_sent_kind_decodes(
    union: object, directions: dict[str, tuple[type[msgspec.Struct], ...]]
) -> None:
    decodable = set(typing.get_args(union))
    sent = {cls for classes in directions.values() for cls in classes}
    assert decodable == sent


def test_dead_kinds_stay_gone() -> None:
    """No ``stop`` (the supervisor stops a child with SIGTERM) and no shard ``applied``
    (nothing read it): a kind that no receiver reads is not part of the protocol."""
    assert not [key for key in _classes() if key[1] == "stop"]
    shard_says = {str(c.__struct_config__.tag) for c in messages.DIRECTIONS["shard → supervisor"]}
    assert shard_says == {"ready", "heartbeat", "drained"}
