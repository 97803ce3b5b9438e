"""The control socket under hostile input: non-finite numbers, deep nesting and
huge ids are refused with an error reply; nothing is stored for a refused push
and the server keeps serving."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from portunus.control.auth import Authenticator
from portunus.control.rpc.protocol import MAX_REQUEST_BYTES

from .conftest import OPERATOR_TOKEN, expect_error
from .test_control_rpc import raw_exchange

BODY = {"listen_port": 18080, "targets": [{"host": "127.0.0.1", "port": 9090}]}


def _push_line(raw_params: str, rid: int = 1) -> bytes:
    return (
        f'{{"id": {rid}, "token": "{OPERATOR_TOKEN}", "method": "rules.push", "params": {raw_params}}}\n'
    ).encode()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_non_finite_interval_on_the_socket_stores_nothing(harness: Any, value: str) -> None:
    params = (
        '{"listen_port": 18080, "targets": [{"host": "127.0.0.1", "port": 9090}], '
        f'"health_check_interval_secs": {value}}}'
    )
    replies = await raw_exchange(harness.settings.socket_path, _push_line(params))
    assert replies[0]["error"]["code"] == "bad_request", replies
    assert (await harness.call("rules.list"))["rules"] == []


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, 1e-9, 3601.0, True, "5"])
async def test_service_refuses_bad_interval_even_past_json(harness: Any, value: Any) -> None:
    """The validators hold when a caller hands Python floats straight in (no JSON)."""
    principal = await Authenticator(harness.store).authenticate(OPERATOR_TOKEN)
    with pytest.raises(Exception) as info:
        await harness.service.push(principal, {**BODY, "health_check_interval_secs": value})
    assert getattr(info.value, "code", None) == "validation.health_check_interval_secs"
    assert (await harness.call("rules.list"))["rules"] == []


@pytest.mark.parametrize("ack", [math.nan, math.inf, 0, 301])
async def test_service_refuses_bad_ack_timeout(harness: Any, ack: float) -> None:
    principal = await Authenticator(harness.store).authenticate(OPERATOR_TOKEN)
    with pytest.raises(Exception) as info:
        await harness.service.push(principal, {**BODY, "ack_timeout": ack})
    assert getattr(info.value, "code", None) == "validation.ack_timeout"
    assert (await harness.call("rules.list"))["rules"] == []


async def test_deep_nesting_gets_an_answer_and_the_server_survives(harness: Any) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    replies = await raw_exchange(harness.settings.socket_path, deep + b"\n")
    assert replies[0]["error"]["code"] == "bad_request"
    assert "nested deeper" in replies[0]["error"]["message"]
    params = '{"x": ' + "[" * 100 + "]" * 100 + "}"
    replies = await raw_exchange(harness.settings.socket_path, _push_line(params))
    assert "nested deeper" in replies[0]["error"]["message"]
    assert (await harness.call("health"))["status"] == "ok"


@pytest.mark.parametrize("rid", [2**63, 10**30, "9" * 40, -1, 1.5, True])
async def test_huge_rule_ids_are_validation_errors(harness: Any, rid: Any) -> None:
    for method in ("rules.get", "rules.remove"):
        await expect_error(harness.call(method, {"id": rid}), "validation.id")


async def test_oversize_limit_still_applies(harness: Any) -> None:
    line = json.dumps(
        {"id": 1, "method": "health", "params": {"pad": "x" * MAX_REQUEST_BYTES}}
    ).encode()
    replies = await raw_exchange(harness.settings.socket_path, line + b"\n")
    assert replies[0]["error"]["code"] == "bad_request"


@pytest.mark.parametrize(
    ("key", "value", "code"),
    [
        ("since", "", "validation.since"),
        ("until", "99999999999999999d", "validation.until"),
        ("since", "0001-01-01T00:00:00+14:00", "validation.since"),
        ("until", 1e300, "validation.until"),
        ("cursor", "9" * 30, "validation.cursor"),
        ("cursor", "9223372036854775808", "validation.cursor"),
    ],
)
async def test_audit_filters_out_of_range_are_validation_errors(
    harness: Any, key: str, value: Any, code: str
) -> None:
    await expect_error(harness.call("audit.list", {key: value}), code)
