"""Interleaved measurement rounds and the statistics reported from them.

The machine is small and noisy, so every contender is measured several times and the
median is reported. Within a round the contenders run back to back, and the starting
contender rotates from round to round, so slow drift (thermal, a noisy neighbour)
lands on all of them alike instead of on whichever ran last.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from bench.forwarders import Endpoint

Sample = dict[str, float]
# After this many failed measurements a contender is dropped with the last reason.
MAX_FAILURES = 2


def summarize(values: list[float]) -> dict[str, Any]:
    """Median, extremes and quartiles of one metric over the rounds."""
    ordered = sorted(values)
    out: dict[str, Any] = {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "samples": values,
    }
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        out["q1"], out["q3"] = q1, q3
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _log_hint(ep: Endpoint) -> str:
    """The contender's last error-looking log line, to say why it failed."""
    if ep.service is None:
        return ""
    lines = [ln for ln in ep.service.log_tail(50).splitlines() if "error" in ln.lower()]
    return f" (log: {lines[-1].strip()[:300]})" if lines else ""


def run_rounds(
    label: str,
    endpoints: Mapping[str, Endpoint | str],
    rounds: int,
    measure: Callable[[Endpoint], Sample],
) -> dict[str, list[Sample] | str]:
    """Measure every available endpoint ``rounds`` times, round-robin, rotating.

    Returns per contender either its list of samples or the reason it has none.
    """
    out: dict[str, list[Sample] | str] = {
        name: (ep if isinstance(ep, str) else []) for name, ep in endpoints.items()
    }
    failures: dict[str, int] = {}
    last_error: dict[str, str] = {}
    names = [n for n, ep in endpoints.items() if not isinstance(ep, str)]
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for name in order:
            ep = endpoints[name]
            assert not isinstance(ep, str)
            if isinstance(out[name], str):
                continue
            if ep.service is not None and not ep.service.alive():
                out[name] = (
                    f"{name} exited with {ep.service.proc.returncode} during the run: "
                    f"{ep.service.log_tail(5)}"
                )
                continue
            try:
                sample = measure(ep)
            except (RuntimeError, OSError, ValueError) as exc:
                failures[name] = failures.get(name, 0) + 1
                last_error[name] = f"measurement failed: {exc}{_log_hint(ep)}"
                log(f"{label} round {r + 1}/{rounds} {name}: FAILED {exc}")
                if failures[name] >= MAX_FAILURES:
                    out[name] = last_error[name]
                continue
            samples = out[name]
            assert isinstance(samples, list)
            samples.append(sample)
            shown = ", ".join(f"{k}={v:,.4g}" for k, v in sample.items())
            log(f"{label} round {r + 1}/{rounds} {name}: {shown}")
    for name, samples in out.items():
        if isinstance(samples, list) and not samples:
            out[name] = last_error.get(name, "no successful measurement")
    return out


def summarize_all(per_fwd: Mapping[str, list[Sample] | str]) -> dict[str, Any]:
    """{contender: {metric: summary}} or {contender: {"error": reason}}."""
    out: dict[str, Any] = {}
    for name, samples in per_fwd.items():
        if isinstance(samples, str):
            out[name] = {"error": samples}
            continue
        keys = samples[0].keys()
        out[name] = {k: summarize([s[k] for s in samples if k in s]) for k in keys}
    return out
