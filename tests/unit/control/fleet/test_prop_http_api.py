"""Property: no HTTP request to the operator API produces a 5xx, and a request
that answers an error stores nothing.

The whole stack below the HTTP server runs for real: the Starlette app (through
httpx's ASGI transport), the control socket, the rule service, the client service
and SQLite; only the data plane is a fake that acknowledges every rule.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portunus.config import Settings
from portunus.control.store import Store
from portunus.web.app import create_app

from ..conftest import FakePlane
from .conftest import OPERATOR_TOKEN, Edge, build_edge

AUTH = {"Authorization": f"Bearer {OPERATOR_TOKEN}", "Content-Type": "application/json"}

# ------------------------------------------------------------------ strategies

numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(0, 70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            0,
            1,
            -1,
            0.1,
            0.05,
            3600,
            3601,
            65535,
            65536,
            10**12,
            10**12 + 1,
            2**63,
            1e308,
            math.inf,
            -math.inf,
            math.nan,
        ]
    ),
)
scalars = st.one_of(
    st.none(), st.booleans(), numbers, st.text(max_size=40), st.text(min_size=200, max_size=600)
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c, max_size=5),
    max_leaves=15,
)
ports = st.one_of(st.integers(20000, 20100), numbers, scalars)
hosts = st.one_of(
    st.sampled_from(["127.0.0.1", "::1", "h.example", "bad host", "", "a" * 300]), scalars
)
target = st.dictionaries(
    st.sampled_from(
        ["host", "port", "port_start", "port_end", "priority", "proxy_protocol", "weight"]
    ),
    st.one_of(hosts, ports, st.sampled_from(["v1", "v2", "v3"]), json_values),
    max_size=6,
)
caps = st.dictionaries(
    st.sampled_from(
        ["bandwidth_in_bps", "new_connections_per_sec", "concurrent_connections_burst", "nope"]
    ),
    st.one_of(numbers, st.none(), scalars),
    max_size=4,
)
rule_body = st.fixed_dictionaries(
    {},
    optional={
        "client": st.one_of(st.just("local"), scalars),
        "protocol": st.one_of(st.sampled_from(["tcp", "udp", "TCP", "sctp"]), scalars),
        "listen_port": ports,
        "listen_port_start": ports,
        "listen_port_end": ports,
        "targets": st.one_of(st.lists(target, max_size=10), json_values),
        "sni_pattern": st.one_of(
            st.sampled_from(["a.example", "*.example", "*", "a" * 300]), scalars
        ),
        "proxy_protocol": st.one_of(st.sampled_from(["v1", "v2", "v3"]), scalars),
        "prefer_ipv6": scalars,
        "rate_limit": st.one_of(caps, json_values),
        "health_check_interval_secs": numbers,
        "owner": scalars,
    },
)
# A valid body with one or two keys replaced: reaches the checks behind the schema.
VALID = {"listen_port": 20500, "targets": [{"host": "127.0.0.1", "port": 9}]}
near_valid = st.tuples(
    st.integers(20000, 20999),
    st.dictionaries(
        st.sampled_from(
            [
                "health_check_interval_secs",
                "rate_limit",
                "targets",
                "sni_pattern",
                "client",
                "prefer_ipv6",
                "protocol",
                "proxy_protocol",
                "listen_port",
            ]
        ),
        st.one_of(numbers, scalars, caps, st.lists(target, max_size=3), json_values),
        max_size=2,
    ),
).map(lambda pb: {**VALID, "listen_port": pb[0], **pb[1]})
# Every numeric field of a valid body set to a non-finite value (sent as NaN,
# Infinity or, with overflow, 1e400).
non_finite = st.tuples(
    st.integers(20000, 20999),
    st.sampled_from(["health", "cap", "priority", "port"]),
    st.sampled_from([math.inf, -math.inf, math.nan]),
).map(
    lambda t: {
        **VALID,
        "listen_port": t[0],
        **({"health_check_interval_secs": t[2]} if t[1] == "health" else {}),
        **({"rate_limit": {"bandwidth_in_bps": t[2]}} if t[1] == "cap" else {}),
        **(
            {"targets": [{"host": "127.0.0.1", "port": 9, "priority": t[2]}]}
            if t[1] == "priority"
            else {}
        ),
        **({"targets": [{"host": "127.0.0.1", "port": t[2]}]} if t[1] == "port" else {}),
    }
)
enrollment = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.text(max_size=80), scalars),
        "address": hosts,
        "ttl_secs": numbers,
        "extra": json_values,
    },
)


def encode(doc: Any, overflow: bool = False) -> bytes:
    """JSON text as a hostile client would send it: NaN/Infinity literals, or with
    ``overflow`` infinities written as ``1e400`` (valid JSON that parses to inf)."""
    text = json.dumps(doc, allow_nan=True)
    if overflow:
        text = text.replace("Infinity", "1e400")
    return text.encode()


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    json_values.map(encode),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)

# ------------------------------------------------------------------ the stack


class Stack:
    """One control (edge-capable) + web app in a private event loop, shared by all
    examples of a test: building it per example would dominate the run time."""

    def __init__(self, root: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.settings = Settings(data_dir=str(root / "data"), runtime_dir=str(root / "run"))
        self.settings.ack_timeout_secs = 2.0
        self.edge: Edge = self.loop.run_until_complete(self._start())

    async def _start(self) -> Edge:
        self.store = await Store.open(self.settings.db_path)
        edge = await build_edge(self.settings, self.store, FakePlane())
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(self.settings)), base_url="http://api"
        )
        return edge

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def count(self, table: str) -> int:
        async with self.store.read() as db, db.execute(f"SELECT count(*) FROM {table}") as cur:
            return (await cur.fetchone())[0]

    def close(self) -> None:
        async def stop() -> None:
            await self.http.aclose()
            await self.edge.close()
            await self.store.close()

        self.run(stop())
        self.loop.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="pprop-", dir="/tmp"))
    s = Stack(root)
    yield s
    s.close()
    shutil.rmtree(root, ignore_errors=True)


def stored(r: httpx.Response) -> bool:
    """201, or the contract's 504 ``ack_timeout``: the rule is stored pending and
    turns active when the node answers (a tiny ``?ack_timeout=`` gets this)."""
    return r.status_code == 201 or (
        r.status_code == 504 and r.json()["error"]["code"] == "ack_timeout"
    )


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500 or stored(r), (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["code"], str) and isinstance(err["message"], str)
        assert len(r.content) < 64 * 1024


# ------------------------------------------------------------------ properties


@settings(max_examples=max(300, settings.default.max_examples))
@given(
    body=st.one_of(rule_body, near_valid, non_finite),
    ack=st.one_of(st.none(), st.none(), st.none(), st.text(max_size=8), numbers.map(str)),
    overflow=st.booleans(),
)
def test_push_bodies_never_5xx_and_refusals_store_nothing(
    stack: Stack, body: dict[str, Any], ack: Any, overflow: bool
) -> None:
    async def go() -> None:
        before = await stack.count("rules")
        params = {} if ack is None else {"ack_timeout": ack}
        r = await stack.http.post(
            "/v1/rules", content=encode(body, overflow), headers=AUTH, params=params
        )
        check_answer(r)
        after = await stack.count("rules")
        assert after == before + (1 if stored(r) else 0), (r.status_code, r.text[:300])
        if r.status_code == 201:
            rule = r.json()
            assert math.isfinite(rule["health_check_interval_secs"])
            listed = await stack.http.get("/v1/rules", headers=AUTH)
            assert listed.status_code == 200, listed.text[:300]

    stack.run(go())


@given(raw=raw_bodies, path=st.sampled_from(["/v1/rules", "/v1/rules/1", "/v1/client-enrollments"]))
def test_raw_bodies_never_5xx(stack: Stack, raw: bytes, path: str) -> None:
    async def go() -> None:
        before = (await stack.count("rules"), await stack.count("clients"))
        method = "PUT" if path == "/v1/rules/1" else "POST"
        r = await stack.http.request(method, path, content=raw, headers=AUTH)
        check_answer(r)
        if r.status_code >= 400:
            assert (await stack.count("rules"), await stack.count("clients")) == before

    stack.run(go())


@given(
    body=st.one_of(
        st.fixed_dictionaries({"rate_limit": st.one_of(caps, json_values)}), json_values
    ),
    rid=st.one_of(st.integers(-5, 5), st.text(max_size=25), st.integers(2**62, 2**70)),
)
def test_rule_updates_and_ids_never_5xx(stack: Stack, body: Any, rid: Any) -> None:
    async def go() -> None:
        path = "/v1/rules/" + quote(str(rid), safe="")
        r = await stack.http.put(path, content=encode(body), headers=AUTH)
        check_answer(r)
        for method in ("GET", "DELETE"):
            check_answer(await stack.http.request(method, path, headers=AUTH))

    stack.run(go())


@given(body=enrollment)
def test_enrollments_never_5xx_and_refusals_store_nothing(
    stack: Stack, body: dict[str, Any]
) -> None:
    async def go() -> None:
        before = await stack.count("clients")
        r = await stack.http.post("/v1/client-enrollments", content=encode(body), headers=AUTH)
        check_answer(r)
        assert await stack.count("clients") == before + (1 if r.status_code == 201 else 0), r.text[
            :300
        ]
        audit = await stack.http.get("/v1/audit", params={"limit": 5}, headers=AUTH)
        assert audit.status_code == 200
        for entry in audit.json()["entries"]:
            assert len(entry["target"] or "") <= 250

    stack.run(go())


@given(
    query=st.dictionaries(
        st.sampled_from(["limit", "since", "until", "cursor", "client", "owner"]),
        st.one_of(st.text(max_size=30), numbers.map(str)),
        max_size=4,
    )
)
def test_query_strings_never_5xx(stack: Stack, query: dict[str, str]) -> None:
    async def go() -> None:
        for path in ("/v1/audit", "/v1/rules", "/v1/clients"):
            check_answer(await stack.http.get(path, params=query, headers=AUTH))

    stack.run(go())
