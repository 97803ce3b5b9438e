"""Hypothesis profiles for the unit tests.

``portunus`` (the default) keeps every property test to a few seconds; run the
fuzz profile for a long search: ``pytest --hypothesis-profile=fuzz tests/unit -k prop``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "portunus", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "fuzz", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("portunus")
