"""Pure formatting helpers: tables, byte units, relative times."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from portunus.cli.common import parse_when
from portunus.cli.output import human_bytes, rule_line, table, targets_text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB (1024)"),
        (1234567, "1.2 MiB (1234567)"),
        (5 * 1024**3, "5.0 GiB (5368709120)"),
        (None, "-"),
    ],
)
def test_human_bytes(n, text) -> None:
    assert human_bytes(n) == text


def test_table_pads_columns_and_strips_trailing_blanks() -> None:
    out = table(("A", "LONGER", "C"), [("xxxx", "y", ""), ("z", "", "last")])
    assert out.splitlines() == [
        "A     LONGER  C",
        "xxxx  y",
        "z             last",
    ]


def test_targets_text_brackets_ipv6_and_hides_lone_priority() -> None:
    assert targets_text({"targets": [{"host": "::1", "port": 80, "priority": 1}]}) == "[::1]:80"
    assert targets_text({"targets": [{"host": "h", "port": 80, "priority": 3}]}) == "h:80@3"
    assert (
        targets_text({"targets": [{"host": "h", "port_start": 1, "port_end": 5, "priority": 1}]})
        == "h:1-5"
    )


def test_rule_line_for_a_range() -> None:
    r = {
        "id": 3,
        "state": "pending",
        "client": "edge",
        "protocol": "udp",
        "listen_port_start": 10,
        "listen_port_end": 12,
        "targets": [{"host": "h", "port_start": 20, "port_end": 22, "priority": 1}],
    }
    assert rule_line(r) == "rule 3 pending: edge udp 10-12 -> h:20-22"


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", "2024-05-01T11:00:00Z"),
        ("30m", "2024-05-01T11:30:00Z"),
        ("2d", "2024-04-29T12:00:00Z"),
        ("1h30m", "2024-05-01T10:30:00Z"),
        ("now", "2024-05-01T12:00:00Z"),
        ("2024-04-01T08:00:00Z", "2024-04-01T08:00:00Z"),
        ("2024-04-01T08:00:00-01:00", "2024-04-01T09:00:00Z"),
        ("2024-04-01 08:00", "2024-04-01T08:00:00Z"),
        ("2024-04-01", "2024-04-01T00:00:00Z"),
    ],
)
def test_parse_when(text, expected) -> None:
    assert parse_when(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "1x", "h1", "yesterday", "2024-13-01"])
def test_parse_when_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_when(text, now=NOW)
