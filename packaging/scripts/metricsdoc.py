"""The metric tables of docs/reference/metrics.md, rendered from the catalog.

    python packaging/scripts/metricsdoc.py          # rewrite the generated part in place
    python packaging/scripts/metricsdoc.py --check  # exit 1 when the file is stale

Only the part between the BEGIN/END markers is generated; the prose around it is
written by hand.  tests/unit/metrics/test_catalog.py fails when the two drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from portunus.metrics.catalog import CATALOG, SECTIONS, Metric  # noqa: E402

DOC = REPO / "docs" / "reference" / "metrics.md"
BEGIN = "<!-- BEGIN generated from portunus/metrics/catalog.py: `make reference` -->"
END = "<!-- END generated -->"


def _row(m: Metric) -> str:
    meaning = m.help + (f" {m.note}" if m.note else "")
    return f"| `{m.name}` | {m.kind} | {', '.join(m.labels)} | {meaning} |"


def tables() -> str:
    out: list[str] = []
    for section in SECTIONS:
        rows = [_row(m) for m in CATALOG if m.section == section]
        out += [f"### {section}", "", "| metric | type | labels | meaning |", "|---|---|---|---|"]
        out += rows + [""]
    return "\n".join(out).rstrip("\n")


def render(text: str) -> str:
    """``text`` with the part between the markers replaced by the current tables."""
    head, sep, rest = text.partition(BEGIN)
    if not sep or END not in rest:
        raise SystemExit(f"{DOC}: the {BEGIN!r} / {END!r} markers are missing")
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n\n{tables()}\n\n{END}{tail}"


def main(argv: list[str]) -> int:
    current = DOC.read_text()
    wanted = render(current)
    if "--check" in argv:
        if current != wanted:
            print(f"{DOC} is stale: run `make reference`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
