"""The counter-snapshot benchmark runs end to end on a small fleet.

PYTHONPATH=$PWD .venv/bin/python -m pytest bench/test_counter_snapshot.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import counter_snapshot  # noqa: E402


def test_every_case_is_timed() -> None:
    args = argparse.Namespace(clients=20, rules_each=2, rounds=2)
    res = asyncio.run(counter_snapshot.measure(args))
    assert list(res) == [
        "first (reads every rule)",
        "idle (nothing moved)",
        "one client's counters moved",
        "500 clients sent a fresh stats frame",
        "one rule removed",
    ]
    assert all(ms > 0 for ms in res.values())
