"""Click option types for numbers, built from ``portunus.bounds``.

``click.FloatRange(min=0, min_open=True)`` accepts ``inf`` and ``nan`` (``nan``
fails every comparison, so it passes every range check); these types refuse
every non-finite value and say the documented range, with click's usual exit 2.
"""

from __future__ import annotations

from typing import Any

import click

from portunus.bounds import Bound
from portunus.errors import PortunusError


class BoundedNumber(click.ParamType):
    """A finite int or float within a ``Bound``."""

    def __init__(self, bound: Bound) -> None:
        self.bound = bound
        self.name = "integer" if bound.integer else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            value = str(value)
        where = param.opts[0] if param is not None and param.opts else "value"
        try:
            return self.bound.parse_text(value, where)
        except PortunusError:
            kind = "an integer" if self.bound.integer else "a finite number"
            self.fail(f"{value[:40]!r} is not {kind} in {self.bound.text()}", param, ctx)

    def __repr__(self) -> str:
        return f"BoundedNumber({self.bound.text()})"
