"""Server-rendered SVG charts of a traffic series: no chart library, no script.

The SVG is drawn in a fixed coordinate box and stretched to the page width
(``preserveAspectRatio="none"`` with non-scaling strokes), so one computation
serves every screen size; labels live in HTML next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT = 600, 160
MAX_POINTS = 300  # a day of minutes is drawn as 288 five-minute points


@dataclass(frozen=True, slots=True)
class Chart:
    w: int
    h: int
    line_in: str
    line_out: str
    area_in: str
    grid: tuple[float, ...]
    peak: float
    start: int
    end: int


def _points(values: list[float], peak: float) -> list[tuple[float, float]]:
    step = WIDTH / (len(values) - 1) if len(values) > 1 else WIDTH
    usable = HEIGHT - 8
    return [
        (round(i * step, 1), round(HEIGHT - (v / peak) * usable, 1)) for i, v in enumerate(values)
    ]


def _join(points: list[tuple[float, float]]) -> str:
    return " ".join(f"{x},{y}" for x, y in points)


def traffic_chart(traffic: dict[str, Any]) -> Chart:
    """A ``traffic.query`` answer as bytes/s lines (bucket bytes / bucket width)."""
    width = 60 if traffic.get("resolution") == "minute" else 3600
    series = traffic.get("series") or []
    group = max(1, -(-len(series) // MAX_POINTS))
    rin: list[float] = []
    rout: list[float] = []
    for i in range(0, len(series), group):
        chunk = series[i : i + group]
        rin.append(sum(p["bytes_in"] for p in chunk) / (width * len(chunk)))
        rout.append(sum(p["bytes_out"] for p in chunk) / (width * len(chunk)))
    rin, rout = rin or [0.0], rout or [0.0]
    peak = max(max(rin), max(rout))
    scale = peak if peak > 0 else 1.0
    line_in = _points(rin, scale)
    area = [(line_in[0][0], float(HEIGHT)), *line_in, (line_in[-1][0], float(HEIGHT))]
    return Chart(
        w=WIDTH,
        h=HEIGHT,
        line_in=_join(line_in),
        line_out=_join(_points(rout, scale)),
        area_in=_join(area),
        grid=tuple(round(HEIGHT - f * (HEIGHT - 8), 1) for f in (0.25, 0.5, 0.75, 1.0)),
        peak=peak,
        start=int(traffic.get("from", 0)),
        end=int(traffic.get("to", 0)),
    )
