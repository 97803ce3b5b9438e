"""Checks of bench/fleet_views.py: the exposition counting it reports, and the
client-row count it takes from the UI page."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.fleet_views import _ROW, exposition_counts  # noqa: E402

EXPO = """\
# HELP portunus_clients_connected Remote edge clients with a live link to this server
# TYPE portunus_clients_connected gauge
portunus_clients_connected 10000.0
# HELP portunus_rule_state 1 for the rule's current state
# TYPE portunus_rule_state gauge
portunus_rule_state{client="a",rule="1",owner="",state="active"} 1.0
portunus_rule_state{client="b",rule="2",owner="",state="active"} 1.0
portunus_control_rpc_seconds_bucket{le="0.005",method="rules.list"} 3.0
portunus_control_rpc_seconds_count{method="rules.list"} 3.0
"""


def test_exposition_counts_samples_per_family() -> None:
    e = exposition_counts(EXPO)
    assert e.samples == 5
    assert e.families["portunus_clients_connected"] == 1
    assert e.families["portunus_rule_state"] == 2
    assert e.families["portunus_control_rpc_seconds_bucket"] == 1
    assert e.size == len(EXPO.encode())


def test_exposition_counts_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="not an exposition sample"):
        exposition_counts("{oops} 1\n")


def test_client_rows_skip_the_enroll_link() -> None:
    page = (
        b'<a class="button" href="/clients/enroll">Enroll a client</a>'
        b'<td><a href="/clients/01ABC">edge-1</a></td>'
        b'<td><a href="/clients/01ABD">edge-2</a></td>'
        b'<a href="/clients/01ABD/revoke">Revoke</a>'
    )
    assert len(set(_ROW.findall(page))) == 2
