"""JSON from peers we do not trust: bounded nesting, finite numbers only.

``json.loads`` recurses once per ``[``/``{``, so ~200 KB of ``[[[…`` raises
``RecursionError`` (a 500, or a dead connection handler) long before a size limit
helps; and it turns ``NaN``/``Infinity`` and ``1e400`` into floats that no later
``json.dumps(allow_nan=False)`` or SQLite CHECK survives.  ``loads`` here refuses
both before anything is built: a cheap pre-scan (C-speed string operations, no
Python loop per character) bounds the depth, and the parse hooks refuse
non-finite numbers.  HTTP bodies, the control socket and the edge link all parse
through it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from portunus.bounds import MAX_JSON_DEPTH

# A JSON string: quote, then runs of plain characters or escapes, then quote.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_ONE_KIND = str.maketrans("{}", "[]")


class JsonRejected(ValueError):
    """Not acceptable JSON; ``str()`` is a message fit for the sender."""


def _reject_constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRejected(f"number {text[:40]} is out of range (numbers must be finite)")
    return value


def too_deep(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool | None:
    """True when the brackets of ``text`` nest deeper than ``max_depth``; ``None``
    when the pre-scan cannot tell (unbalanced brackets of bounded depth: let the
    parser report the syntax error); False when they certainly do not.

    Each ``replace("[]", "")`` pass removes exactly one level of innermost pairs,
    so ``max_depth`` passes empty the bracket skeleton of any balanced document no
    deeper than ``max_depth``.  Whatever survives is deeper, or unbalanced; with at
    most ``max_depth`` surviving openers the parser can recurse at most
    ``2 * max_depth`` levels, which is safe to try.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False
    skeleton = _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_ONE_KIND)
    if "[" * (max_depth + 1) in skeleton:  # the usual attack: one long run of openers
        return True
    for _ in range(max_depth):
        shorter = skeleton.replace("[]", "")
        if shorter == skeleton:
            break
        skeleton = shorter
    if not skeleton:
        return False
    if skeleton.count("[") > max_depth:
        return True
    return None


def loads(data: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse ``data`` (UTF-8 if bytes); raise ``JsonRejected`` for anything that is
    not JSON with finite numbers nested at most ``max_depth`` levels."""
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise JsonRejected("not UTF-8 text") from None
    else:
        text = data
    deep = too_deep(text, max_depth)
    if deep:
        raise JsonRejected(f"JSON nested deeper than {max_depth} levels")
    try:
        doc = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except JsonRejected:
        raise
    except json.JSONDecodeError as exc:
        raise JsonRejected(f"{exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise JsonRejected(str(exc) or type(exc).__name__) from None
    if deep is None:  # it parsed, so it was balanced: deeper than allowed after all
        raise JsonRejected(f"JSON nested deeper than {max_depth} levels")
    return doc


def dumps(value: Any, **kw: Any) -> str:
    """Compact JSON that refuses non-finite numbers instead of writing ``Infinity``."""
    kw.setdefault("separators", (",", ":"))
    return json.dumps(value, allow_nan=False, **kw)
