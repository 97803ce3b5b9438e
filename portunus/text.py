"""Small text predicates shared by every boundary that parses numbers from strings."""

from __future__ import annotations


def is_ascii_digits(s: str) -> bool:
    """True for a non-empty run of ``0``-``9`` only.

    ``str.isdigit()`` alone is not enough: it accepts superscripts and other Unicode
    digits (``'²'``) that ``int()`` then rejects with a bare ``ValueError``, turning
    a validation error into a crash.
    """
    return s.isascii() and s.isdigit()
