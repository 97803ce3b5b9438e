"""/v1/openapi.json: a valid OpenAPI 3.1 document that covers every route the app has."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.routing import Route

from portunus.config import Settings
from portunus.web.app import create_app
from portunus.web.openapi import ERROR_STATUSES, build_openapi
from portunus.web.routes.bodies import check

METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (path, m): op
        for path, item in doc["paths"].items()
        for m, op in item.items()
        if m in METHODS
    }


def test_document_structure() -> None:
    doc = build_openapi("1.2.3")
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["version"] == "1.2.3"
    assert doc["components"]["securitySchemes"]["bearer"] == {
        **doc["components"]["securitySchemes"]["bearer"],
        "type": "http",
        "scheme": "bearer",
    }
    for ref in _refs(doc):
        assert _resolve(doc, ref) is not None, ref
    ops = _operations(doc)
    ids = [op["operationId"] for op in ops.values()]
    assert len(ids) == len(set(ids))
    for (path, method), op in ops.items():
        for param in doc["paths"][path].get("parameters", []):
            assert "{" + param["name"] + "}" in path
        assert all(str(s).isdigit() and 200 <= int(s) < 600 for s in op["responses"]), (
            path,
            method,
        )
        public = op.get("security") == []
        if not public:
            assert {"401", "403", "500", "503"} <= set(op["responses"]), (path, method)
        for status, resp in op["responses"].items():
            if int(status) >= 400:
                assert _resolve(doc, resp["$ref"])["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"
                }
    # Every documented error status is used by some operation.
    used = {s for op in ops.values() for s in op["responses"]}
    assert set(ERROR_STATUSES) <= used


def test_contract_statuses_are_documented_where_they_happen() -> None:
    ops = _operations(build_openapi())
    push = ops[("/v1/rules", "post")]["responses"]
    assert {"201", "400", "404", "409", "413", "422", "504"} <= set(push)
    assert "204" in ops[("/v1/rules/{id}", "delete")]["responses"]
    assert ops[("/v1/rules", "post")]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RuleBody"
    }
    assert ops[("/v1/rules/{id}", "put")]["requestBody"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/RuleUpdate"}
    assert (
        "text/event-stream"
        in ops[("/v1/rules/{id}/stats/stream", "get")]["responses"]["200"]["content"]
    )


def test_validates_with_openapi_spec_validator() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(build_openapi())


def test_every_app_route_is_documented_and_nothing_else(settings: Settings) -> None:
    app = create_app(settings)
    served = set()
    for r in app.routes:
        assert isinstance(r, Route)
        if not r.path.startswith("/v1/"):  # the Web UI's pages are not API operations
            continue
        served |= {(r.path, m.lower()) for m in (r.methods or set()) - {"HEAD"}}
    assert served == set(_operations(build_openapi()))


async def test_served_without_token(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/openapi.json")
    assert r.status_code == 200
    assert r.json()["openapi"] == "3.1.0"
    assert set(r.json()["paths"]) == set(build_openapi()["paths"])


VALID = [
    {"listen_port": 80, "targets": [{"host": "h", "port": 1}]},
    {
        "client": 3,
        "protocol": "udp",
        "listen_port_start": 10,
        "listen_port_end": 20,
        "targets": [{"host": "h", "port_start": 10, "port_end": 20, "priority": 2}],
        "sni_pattern": None,
        "proxy_protocol": "v2",
        "prefer_ipv6": True,
        "rate_limit": None,
        "health_check_interval_secs": 0.5,
    },
    {
        "listen_port": 443,
        "sni_pattern": "*.example.com",
        "rate_limit": {"concurrent_connections": 5},
        "targets": [{"host": "::1", "port": 8443, "proxy_protocol": "v1"}],
    },
]
INVALID = [
    {},
    {"listen_port": 80, "targets": [{"host": "h", "port": 1}], "x": 1},
    {"listen_port": 80, "listen_port_end": 90, "targets": [{"host": "h", "port": 1}]},
    {"listen_port_start": 80, "targets": [{"host": "h", "port": 1}]},
    {"listen_port": 0, "targets": [{"host": "h", "port": 1}]},
    {"listen_port": 80, "targets": [{"host": "h", "port": 1, "port_start": 1, "port_end": 2}]},
    {"listen_port": 80, "targets": [{"host": "h"}]},
    {"listen_port": 80, "targets": [{"host": "h", "port": 1}] * 9},
    {"listen_port": 80, "protocol": None, "targets": [{"host": "h", "port": 1}]},
    {
        "listen_port": 80,
        "rate_limit": {"new_connections_per_sec": True},
        "targets": [{"host": "h", "port": 1}],
    },
    {"listen_port": 80, "health_check_interval_secs": -1, "targets": [{"host": "h", "port": 1}]},
    "a string",
]


@pytest.mark.parametrize("body", VALID + INVALID)
def test_boundary_checker_agrees_with_json_schema(body: Any) -> None:
    """The hand-written checker and a real JSON Schema 2020-12 validator must agree
    on the published RuleBody schema, so the document describes what is enforced."""
    jsonschema = pytest.importorskip("jsonschema")
    doc = build_openapi()
    root = {"$ref": "#/components/schemas/RuleBody", "components": doc["components"]}
    expected_valid = jsonschema.Draft202012Validator(root).is_valid(body)
    ours = check(body, doc["components"]["schemas"]["RuleBody"])
    assert (not ours) == expected_valid, ours
    assert expected_valid == (body in VALID)
