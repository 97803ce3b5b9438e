"""/v1/rules over ASGI against a fake control socket: mapping, statuses, envelopes."""

from __future__ import annotations

import json

import httpx
import pytest

from portunus.errors import PortunusError

from .fakes import AUTH, RULE, STATS, TOKEN, FakeControl

BODY = {"listen_port": 8080, "targets": [{"host": "127.0.0.1", "port": 9090}]}


async def test_push_forwards_body_and_token_and_answers_201(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["rules.push"] = RULE
    r = await api.post("/v1/rules", json=BODY, headers=AUTH)
    assert r.status_code == 201
    assert r.json() == RULE
    assert r.headers["location"] == "/v1/rules/7"
    [req] = fake.calls("rules.push")
    assert req["token"] == TOKEN
    assert req["params"] == BODY  # no defaults injected: control owns them


async def test_push_passes_ack_timeout_from_query(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    fake.replies["rules.push"] = RULE
    r = await api.post("/v1/rules?ack_timeout=0.5", json=BODY, headers=AUTH)
    assert r.status_code == 201
    assert fake.calls("rules.push")[0]["params"]["ack_timeout"] == 0.5
    r = await api.post("/v1/rules?ack_timeout=0", json=BODY, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "validation.query"
    assert r.json()["error"]["field"] == "ack_timeout"


async def test_push_range_rule_body_is_accepted(api: httpx.AsyncClient, fake: FakeControl) -> None:
    body = {
        "client": "edge-01",
        "listen_port_start": 30000,
        "listen_port_end": 30050,
        "targets": [{"host": "upstream.local", "port_start": 30000, "port_end": 30050}],
        "rate_limit": {"bandwidth_in_bps": 1000, "bandwidth_in_bps_burst": None},
    }
    fake.replies["rules.push"] = RULE
    r = await api.post("/v1/rules", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    assert fake.calls("rules.push")[0]["params"] == body


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (
            PortunusError(
                "activation_failed",
                "port_in_use (port 8080 already bound)",
                rule={**RULE, "state": "failed"},
            ),
            422,
        ),
        (
            PortunusError(
                "ack_timeout",
                "no answer from edge-01 within 2 s",
                rule={**RULE, "state": "pending"},
            ),
            504,
        ),
        (PortunusError("client_not_connected", "edge-01 is offline"), 422),
        (PortunusError("port_conflict", "8080/tcp is used by rule 3"), 409),
        (PortunusError("ambiguous_client", "two clients are named edge", ids=["a", "b"]), 409),
        (PortunusError("client_not_found", "no client edge-09"), 404),
        (PortunusError("validation.range_length_mismatch", "lengths differ", field="targets"), 400),
        (PortunusError("forbidden", "not yours"), 403),
        (PortunusError("unauthenticated", "bad token"), 401),
    ],
)
async def test_push_errors_keep_code_details_and_status(
    api: httpx.AsyncClient, fake: FakeControl, error: PortunusError, status: int
) -> None:
    fake.replies["rules.push"] = error
    r = await api.post("/v1/rules", json=BODY, headers=AUTH)
    assert r.status_code == status
    assert r.json() == {"error": error.to_dict()}
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("body", "code", "field", "words"),
    [
        (
            {"listen_port": "8080", "targets": [{"host": "h", "port": 1}]},
            "validation.port",
            "listen_port",
            "must be an integer, got string",
        ),
        (
            {"listen_port": 70000, "targets": [{"host": "h", "port": 1}]},
            "validation.port",
            "listen_port",
            "between 1 and 65535",
        ),
        ({"listen_port": 80}, "validation.targets", "targets", "targets is required"),
        ({"listen_port": 80, "targets": []}, "validation.targets", "targets", "at least 1"),
        ({"listen_port": 80, "targets": "h:1"}, "validation.targets", "targets", "must be a list"),
        (
            {"listen_port": 80, "targets": [{"port": 1}]},
            "validation.target_host",
            "targets[0].host",
            "required",
        ),
        (
            {"listen_port": 80, "targets": [{"host": "h", "port": 1.5}]},
            "validation.port",
            "targets[0].port",
            "integer",
        ),
        (
            {"listen_port": 80, "targets": [{"host": "h", "port": 1, "port_end": 9}]},
            "validation.targets",
            "targets[0]",
            "port_start and port_end",
        ),
        (
            {"listen_port": 80, "targets": [{"host": "h", "port": 1, "weight": 2}]},
            "validation.unknown_field",
            "targets[0].weight",
            "unknown field",
        ),
        (
            {"listen_port": 80, "targets": [{"host": "h", "port": 1, "priority": 0}]},
            "validation.priority",
            "targets[0].priority",
            "between 1 and 1000",
        ),
        ({"targets": [{"host": "h", "port": 1}]}, "validation.listen_port", "body", "listen_port"),
        (
            {
                "listen_port": 80,
                "listen_port_start": 80,
                "listen_port_end": 81,
                "targets": [{"host": "h", "port": 1}],
            },
            "validation.listen_port",
            "body",
            "not both",
        ),
        (
            {"listen_port": 80, "protocol": "sctp", "targets": [{"host": "h", "port": 1}]},
            "validation.protocol",
            "protocol",
            '"tcp", "udp"',
        ),
        (
            {"listen_port": 80, "proxy_protocol": "v3", "targets": [{"host": "h", "port": 1}]},
            "validation.proxy_protocol",
            "proxy_protocol",
            '"v1"',
        ),
        (
            {"listen_port": 80, "prefer_ipv6": "yes", "targets": [{"host": "h", "port": 1}]},
            "validation.prefer_ipv6",
            "prefer_ipv6",
            "true or false",
        ),
        (
            {
                "listen_port": 80,
                "rate_limit": {"bandwidth": 5},
                "targets": [{"host": "h", "port": 1}],
            },
            "validation.rate_limit",
            "rate_limit.bandwidth",
            "unknown rate_limit key",
        ),
        (
            {
                "listen_port": 80,
                "rate_limit": {"concurrent_connections": -1},
                "targets": [{"host": "h", "port": 1}],
            },
            "validation.rate_limit",
            "rate_limit.concurrent_connections",
            "between 1 and 1000000000000",
        ),
        (
            {
                "listen_port": 80,
                "health_check_interval_secs": 0,
                "targets": [{"host": "h", "port": 1}],
            },
            "validation.health_check_interval_secs",
            "health_check_interval_secs",
            "between 0.1 and 3600",
        ),
        (
            {"listen_port": 80, "targets": [{"host": "h", "port": 1}], "listen": 80},
            "validation.unknown_field",
            "listen",
            "unknown field",
        ),
        ([BODY], "validation.body", "body", "must be an object, got array"),
    ],
)
async def test_push_body_validation_names_the_field(
    api: httpx.AsyncClient, fake: FakeControl, body: object, code: str, field: str, words: str
) -> None:
    r = await api.post("/v1/rules", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == (code, field)
    assert words in err["message"]
    assert err["errors"][0] == {"field": field, "code": code, "message": err["message"]}
    assert fake.calls("rules.push") == []


async def test_push_reports_every_problem(api: httpx.AsyncClient) -> None:
    body = {"listen_port": "x", "protocol": 6, "targets": [{"host": "", "port": 0}]}
    r = await api.post("/v1/rules", json=body, headers=AUTH)
    fields = {e["field"] for e in r.json()["error"]["errors"]}
    assert {"listen_port", "protocol", "targets[0].host", "targets[0].port"} <= fields


@pytest.mark.parametrize(
    ("content", "code", "words"),
    [
        (b"{not json", "validation.json", "line 1, column 2"),
        (b"", "validation.body", "empty"),
        (b'{"listen_port": NaN}', "validation.json", "NaN"),
        (b"\xff\xfe", "validation.json", "UTF-8"),
    ],
)
async def test_unreadable_bodies_are_400(
    api: httpx.AsyncClient, content: bytes, code: str, words: str
) -> None:
    r = await api.post(
        "/v1/rules", content=content, headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == code
    assert words in r.json()["error"]["message"]


async def test_body_over_max_body_is_413(api: httpx.AsyncClient, fake: FakeControl) -> None:
    from portunus.web.routes.bodies import MAX_BODY

    big = json.dumps(
        {"listen_port": 80, "targets": [{"host": "h", "port": 1}], "pad": "x" * MAX_BODY}
    )
    r = await api.post("/v1/rules", content=big, headers=AUTH)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "validation.body_too_large"

    async def chunks():  # no Content-Length: the limit holds while streaming too
        for _ in range(20):
            yield b" " * 65536

    r = await api.post("/v1/rules", content=chunks(), headers=AUTH)
    assert r.status_code == 413
    assert fake.calls("rules.push") == []


async def test_list_forwards_filters(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["rules.list"] = {"rules": [RULE]}
    r = await api.get("/v1/rules?client=edge-01&owner=alice&other=1", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"rules": [RULE]}
    assert fake.calls("rules.list")[0]["params"] == {"client": "edge-01", "owner": "alice"}
    await api.get("/v1/rules", headers=AUTH)
    assert fake.calls("rules.list")[1]["params"] == {}


async def test_get_rule(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["rules.get"] = RULE
    r = await api.get("/v1/rules/7", headers=AUTH)
    assert (r.status_code, r.json()) == (200, RULE)
    assert fake.calls("rules.get")[0]["params"] == {"id": 7}
    fake.replies["rules.get"] = PortunusError("rule_not_found", "no rule 8")
    r = await api.get("/v1/rules/8", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "rule_not_found"


async def test_non_numeric_rule_id_is_404_without_asking_control(
    api: httpx.AsyncClient, fake: FakeControl
) -> None:
    for path in ("/v1/rules/abc", "/v1/rules/0", "/v1/rules/-1", "/v1/rules/abc/stats"):
        r = await api.get(path, headers=AUTH)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "rule_not_found"
    assert fake.requests == []


async def test_update_takes_only_rate_limit(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["rules.update"] = RULE
    caps = {"bandwidth_out_bps": 5000}
    r = await api.put("/v1/rules/7", json={"rate_limit": caps}, headers=AUTH)
    assert (r.status_code, r.json()) == (200, RULE)
    assert fake.calls("rules.update")[0]["params"] == {"id": 7, "rate_limit": caps}
    r = await api.put("/v1/rules/7", json={"rate_limit": None}, headers=AUTH)
    assert r.status_code == 200
    assert fake.calls("rules.update")[1]["params"] == {"id": 7, "rate_limit": None}

    r = await api.put("/v1/rules/7", json={"rate_limit": caps, "listen_port": 81}, headers=AUTH)
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("validation.immutable_field", "listen_port")
    assert "only rate_limit and targets" in err["message"]
    r = await api.put("/v1/rules/7", json={}, headers=AUTH)
    assert r.json()["error"]["code"] == "validation.rate_limit"
    assert len(fake.calls("rules.update")) == 2


async def test_retry_answers_like_the_rpc(api: httpx.AsyncClient, fake: FakeControl) -> None:
    """POST /v1/rules/{id}/retry is rules.retry: the rule once bound, 422
    activation_failed carrying the still-failed rule, 404 rule_not_found."""
    fake.replies["rules.retry"] = RULE
    r = await api.post("/v1/rules/7/retry", headers=AUTH)
    assert (r.status_code, r.json()) == (200, RULE)
    [req] = fake.calls("rules.retry")
    assert (req["params"], req["token"]) == ({"id": 7}, TOKEN)
    failed = {**RULE, "state": "failed", "failure_reason": "port_in_use"}
    fake.replies["rules.retry"] = PortunusError("activation_failed", "port_in_use", rule=failed)
    r = await api.post("/v1/rules/7/retry", headers=AUTH)
    assert r.status_code == 422
    err = r.json()["error"]
    assert (err["code"], err["rule"]) == ("activation_failed", failed)
    fake.replies["rules.retry"] = PortunusError("rule_not_found", "no rule 8")
    r = await api.post("/v1/rules/8/retry", headers=AUTH)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "rule_not_found")
    r = await api.post("/v1/rules/abc/retry", headers=AUTH)
    assert r.status_code == 404
    assert len(fake.calls("rules.retry")) == 3
    r = await api.post("/v1/rules/7/retry")
    assert r.status_code == 401
    assert len(fake.calls("rules.retry")) == 3


async def test_delete_is_204(api: httpx.AsyncClient, fake: FakeControl) -> None:
    r = await api.delete("/v1/rules/7", headers=AUTH)
    assert r.status_code == 204
    assert r.content == b""
    assert fake.calls("rules.remove")[0]["params"] == {"id": 7}
    fake.replies["rules.remove"] = PortunusError("rule_not_found", "no rule 7")
    r = await api.delete("/v1/rules/7", headers=AUTH)
    assert r.status_code == 404


async def test_stats_flags(api: httpx.AsyncClient, fake: FakeControl) -> None:
    fake.replies["rules.stats"] = {**STATS, "per_port": [{"port": 30000, "bytes_in": 1}]}
    r = await api.get("/v1/rules/7/stats?per_port=true", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["per_port"] == [{"port": 30000, "bytes_in": 1}]
    await api.get("/v1/rules/7/stats?per_target=1&per_port=false", headers=AUTH)
    await api.get("/v1/rules/7/stats", headers=AUTH)
    params = [c["params"] for c in fake.calls("rules.stats")]
    assert params == [{"id": 7, "per_port": True}, {"id": 7, "per_target": True}, {"id": 7}]
    r = await api.get("/v1/rules/7/stats?per_port=maybe", headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "per_port"
