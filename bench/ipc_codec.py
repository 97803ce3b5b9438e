"""Cost of one message between processes: dicts + json (before portunus/ipc) vs the
typed msgspec classes, encode and decode of the body (framing and I/O left out).

    python -m bench.ipc_codec [--rounds 2000]

Supervisor channel: the control process's ``apply`` of one rule (a ``rules.push``),
the supervisor's ``applied`` answer, and a ``sync`` of 1,000 rules (a start).  Edge
link: that ``sync`` as a frame, which is still parsed by ``safejson`` (an untrusted
peer) and then checked into its class.  Each is built from the same rules, encoded
and decoded ``--rounds`` times (20 for the syncs); the best of 5 runs, in µs.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from portunus import safejson  # noqa: E402
from portunus.ipc import edge_messages as em  # noqa: E402
from portunus.ipc import messages as m  # noqa: E402
from portunus.rules import Target, build_rule  # noqa: E402

Case = Callable[[list[dict[str, Any]]], object]


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _results(rules: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: {"state": "active", "reason": None} for r in rules}


# The path before: a dict per message, json.dumps, json.loads (safejson on the edge).
BEFORE: dict[str, Case] = {
    "apply": lambda rules: json.loads(
        _dumps({"type": "apply", "seq": 1, "upsert": rules, "remove": []})
    ).get("upsert"),
    "applied": lambda rules: json.loads(
        _dumps({"type": "applied", "seq": 1, "results": _results(rules)})
    ).get("results"),
    "sync": lambda rules: json.loads(_dumps({"type": "sync", "seq": 1, "rules": rules})).get(
        "rules"
    ),
    "edge sync": lambda rules: safejson.loads(
        _dumps({"type": "sync", "seq": 1, "rules": rules})
    ).get("rules"),
}

# The path now: a message class, msgspec encode, decode checked into the class.
AFTER: dict[str, Case] = {
    "apply": lambda rules: m.decode(m.encode(m.Apply(seq=1, upsert=rules, remove=[]))),
    "applied": lambda rules: m.decode(
        m.encode(m.Applied(seq=1, results=m.outcomes(_results(rules))))
    ),
    "sync": lambda rules: m.decode(m.encode(m.Sync(seq=1, rules=rules))),
    "edge sync": lambda rules: em.parse(safejson.loads(em.encode(em.Sync(seq=1, rules=rules)))),
}


def _rules(n: int) -> list[dict[str, Any]]:
    return [
        build_rule(
            id=str(i),
            protocol="tcp",
            listen=(10000 + i, 10000 + i),
            targets=[Target("127.0.0.1", 80)],
        ).to_wire()
        for i in range(n)
    ]


def _best_us(case: Case, rules: list[dict[str, Any]], rounds: int) -> float:
    return min(timeit.repeat(lambda: case(rules), number=rounds, repeat=5)) / rounds * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ipc_codec", description=__doc__)
    p.add_argument("--rounds", type=int, default=2000)
    args = p.parse_args(argv)
    print("| message | dicts + json (µs) | msgspec classes (µs) | ratio |")
    print("|---|---|---|---|")
    for kind in BEFORE:
        n, rounds = (1000, 20) if "sync" in kind else (1, args.rounds)
        rules = _rules(n)
        before = _best_us(BEFORE[kind], rules, rounds)
        after = _best_us(AFTER[kind], rules, rounds)
        label = f"`{kind}`, {n} rule{'s' if n > 1 else ''}"
        print(f"| {label} | {before:.1f} | {after:.1f} | {after / before:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
