"""``--limit`` / ``--cursor`` / ``--all`` for the listing verbs (server lists page by cursor).

Without ``--all`` a verb prints one page (``--limit`` rows, the server's default
100 when absent) and says on stderr how to get the rest; with ``--all`` it follows
``next_cursor`` until the last page, ``--limit`` then being the page size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from portunus.bounds import LIST_LIMIT
from portunus.cli import output
from portunus.cli.common import echo_json
from portunus.cli.numbers import BoundedNumber

limit_option = click.option(
    "--limit",
    type=BoundedNumber(LIST_LIMIT),
    default=None,
    help="At most N rows (server default 100, max 1000); with --all: the page size.",
)
cursor_option = click.option(
    "--cursor", default=None, help="Start after this next_cursor of an earlier call."
)
all_option = click.option(
    "--all", "every", is_flag=True, help="Every row: follow the pages to the end."
)


def fetch(
    call: Callable[[str, dict[str, Any]], Any],
    method: str,
    params: dict[str, Any],
    key: str,
    limit: int | None,
    cursor: str | None,
    every: bool,
) -> dict[str, Any]:
    """One page, or (``every``) all pages merged into one answer with ``next_cursor`` null."""
    base = dict(params)
    if limit is not None:
        base["limit"] = limit
    page_params = {**base, "cursor": cursor} if cursor else base
    result: dict[str, Any] = dict(call(method, page_params))
    if not every:
        return result
    rows: list[Any] = list(result.get(key) or [])
    while result.get("next_cursor"):
        result = dict(call(method, {**base, "cursor": result["next_cursor"]}))
        rows.extend(result.get(key) or [])
    result[key] = rows
    result["next_cursor"] = None
    return result


def more_hint(result: dict[str, Any], key: str) -> None:
    """On stderr: that a page is not the whole list, and how to get the rest."""
    if result.get("next_cursor"):
        shown = len(result.get(key) or [])
        total = result.get("total")
        of = f" of {total}" if isinstance(total, int) else ""
        click.echo(
            f"(more {key}: {shown}{of} shown; --all for every one, or --cursor {result['next_cursor']} "
            "for the next page)",
            err=True,
        )


def show(result: dict[str, Any], key: str, fmt: str, render: Callable[[list[Any]], str]) -> None:
    """Print one listed page: the API's JSON as it came, or ``render(rows)`` for
    people followed by the ``more_hint`` when the list goes on."""
    if fmt == "json":
        echo_json(result)
        return
    click.echo(render(result.get(key) or []))
    more_hint(result, key)


def table_or(
    headers: Sequence[str], row: Callable[[Any], Sequence[Any]], empty: str
) -> Callable[[list[Any]], str]:
    """A ``render`` for ``show``: a table of ``row(item)`` per item, or ``empty``."""
    return lambda items: output.table(headers, map(row, items)) if items else empty
