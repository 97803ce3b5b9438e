"""Prometheus scrapes summed by metric name and label subset."""

from __future__ import annotations

import urllib.request
from pathlib import Path


class Metrics:
    """One scrape: samples by name, summed over every sample whose labels
    include the given ones (so ``value("x_total", rule="a")`` sums shards, owners...)."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))

    def value(self, name: str, default: float = 0.0, **labels: str) -> float:
        found = [
            v
            for lab, v in self.samples.get(name, [])
            if all(lab.get(k) == w for k, w in labels.items())
        ]
        return sum(found) if found else default

    def has(self, name: str, **labels: str) -> bool:
        return any(
            all(lab.get(k) == w for k, w in labels.items()) for lab, _ in self.samples.get(name, [])
        )

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [lab for lab, _ in self.samples.get(name, [])]


def multiproc_value(db_file: str | Path, name: str, **labels: str) -> float:
    """Sum of ``name`` in one prometheus multiprocess file (``counter_<pid>.db``):
    what one process contributed to a scrape."""
    from prometheus_client.multiprocess import MultiProcessCollector

    total = 0.0
    for family in MultiProcessCollector.merge([str(db_file)], accumulate=True):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += float(s.value)
    return total


def scrape(url: str, timeout: float = 5.0) -> Metrics:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        if resp.status != 200:
            raise OSError(f"{url} answered {resp.status}")
        return Metrics(resp.read().decode())
