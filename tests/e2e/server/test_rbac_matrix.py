"""The RBAC matrix against a real server: every CLI verb and HTTP route ×
{superadmin, user with a grant, user without a grant, another user} × {own,
another user's resource} × {CLI, HTTP with a bearer token, HTTP with a Web UI
session cookie}, each asserting the HTTP status, the error code and the CLI exit
code.

Every case is generated from the one table ``OPS``: a row names the operation's
CLI argv and HTTP request as templates over a resource, and the outcome per
actor as ``(own, other's)`` (``carol``, the other user, has a grant of her own
and expects what ``alice`` does).  The resource is made fresh for each case (a
removed rule cannot be removed twice), owned by the actor ("own") or by the
other user ("other's": ``carol``'s, or ``alice``'s when ``carol`` acts).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from portunus.errors import classify
from tests.e2e.support import PortAllocator, ServerFactory

from .rbac_world import PASSWORD, World, make_world

SA, GRANTED, NOGRANT = "root", "alice", "bob"
OTHER = "carol"
ACTORS = (SA, GRANTED, NOGRANT, OTHER)


def other_of(actor: str) -> str:
    return "alice" if actor == OTHER else OTHER


OK = "ok"
NA = None  # the case does not exist (bob can own no rule: he has no grant)
ROLE = "role_required"
NOT_OWNER = "not_owner"

# What a template may name, made fresh per case by World: {key: maker(world, owner)}.
MAKERS: dict[str, Callable[[World, str], Any]] = {
    "rule": lambda w, owner: w.rule(owner),
    "port": lambda w, owner: w.port_of(owner),
    "user": lambda w, owner: owner,
    "temp_user": lambda w, owner: w.user(),
    "new_user": lambda w, owner: w.unique("new"),
    "token": lambda w, owner: w.token_of(owner),
    "grant": lambda w, owner: w.grant_for(owner),
    "client": lambda w, owner: w.client(),
    "revoked_client": lambda w, owner: w.client(revoked=True),
    "owner_flag": lambda w, owner: owner,
    "capped": lambda w, owner: w.rpc(
        "owner_caps.set",
        {"client": "local", "owner": owner, "rate_limit": {"concurrent_connections": 50}},
    )["owner"],
}


@dataclass(frozen=True)
class Op:
    name: str
    uses: tuple[str, ...]
    cli: tuple[str, ...] | None
    http: tuple[str, str, dict[str, Any] | None] | None
    expect: dict[str, tuple[str | None, str | None]]  # actor -> (own, other's)
    ok_status: int = 200


def _push_body(port: str, owner: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "client": "local",
        "listen_port": port,
        "targets": [{"host": "127.0.0.1", "port": 9}],
    }
    if owner is not None:
        body["owner"] = owner
    return body


BOTH_OK = {SA: (OK, OK), GRANTED: (OK, OK), NOGRANT: (OK, OK)}
OWNED = {SA: (OK, OK), GRANTED: (OK, NOT_OWNER), NOGRANT: (NA, NOT_OWNER)}
SELF_ONLY = {SA: (OK, OK), GRANTED: (OK, ROLE), NOGRANT: (OK, ROLE)}
SUPER = {SA: (OK, OK), GRANTED: (ROLE, ROLE), NOGRANT: (ROLE, ROLE)}

OPS: list[Op] = [
    # rules: "other's" push = for carol (--owner), inside carol's grant
    Op(
        "push-rule",
        ("port",),
        ("push-rule", "local", "{port}", "127.0.0.1:9", "{owner_opt}"),
        ("POST", "/v1/rules", _push_body("{port}", "{owner_body}")),
        {SA: (OK, OK), GRANTED: (OK, ROLE), NOGRANT: ("client_not_granted", ROLE)},
        201,
    ),
    Op("list-rules", (), ("list-rules",), ("GET", "/v1/rules", None), BOTH_OK),
    Op("get-rule", ("rule",), None, ("GET", "/v1/rules/{rule}", None), OWNED),
    Op(
        "update-rule",
        ("rule",),
        ("update-rule", "{rule}", "--target", "127.0.0.1:10"),
        ("PUT", "/v1/rules/{rule}", {"rate_limit": {"concurrent_connections": 9}}),
        OWNED,
    ),
    Op(
        "update-rule-targets",
        ("rule",),
        None,
        ("PUT", "/v1/rules/{rule}", {"targets": [{"host": "127.0.0.1", "port": 10}]}),
        OWNED,
    ),
    Op(
        "retry-rule",
        ("rule",),
        ("retry-rule", "{rule}"),
        ("POST", "/v1/rules/{rule}/retry", None),
        OWNED,
    ),
    Op(
        "rule-stats",
        ("rule",),
        ("rule-stats", "{rule}"),
        ("GET", "/v1/rules/{rule}/stats", None),
        OWNED,
    ),
    Op(
        "remove-rule",
        ("rule",),
        ("remove-rule", "{rule}"),
        ("DELETE", "/v1/rules/{rule}", None),
        OWNED,
        204,
    ),
    # traffic history (Web UI charts): a rule's series is its owner's; the summary is scoped
    Op("rule-traffic", ("rule",), None, ("GET", "/v1/traffic?rule={rule}", None), OWNED),
    Op("traffic-summary", (), None, ("GET", "/v1/traffic/summary", None), BOTH_OK),
    # clients
    Op("list-clients", (), ("list-clients",), ("GET", "/v1/clients", None), BOTH_OK),
    # one client: a user sees only the clients its grants name (bob has none)
    Op(
        "show-client",
        (),
        None,
        ("GET", "/v1/clients/local", None),
        {SA: (OK, NA), GRANTED: (OK, NA), NOGRANT: ("client_not_found", NA)},
    ),
    Op(
        "enroll-client",
        ("new_user",),
        ("enroll-client", "{new_user}"),
        ("POST", "/v1/client-enrollments", {"name": "{new_user}"}),
        SUPER,
        201,
    ),
    Op(
        "rename-client",
        ("client", "new_user"),
        ("rename-client", "{client}", "--name", "{new_user}"),
        ("PATCH", "/v1/clients/{client}/name", {"name": "{new_user}"}),
        SUPER,
    ),
    Op(
        "revoke",
        ("client",),
        ("revoke", "{client}"),
        ("POST", "/v1/clients/{client}/revoke", None),
        SUPER,
    ),
    Op(
        "delete-client",
        ("revoked_client",),
        ("delete-client", "{revoked_client}"),
        ("DELETE", "/v1/clients/{revoked_client}", None),
        SUPER,
        204,
    ),
    Op("audit", (), ("audit", "--limit", "5"), ("GET", "/v1/audit?limit=5", None), SUPER),
    # users: "own" = yourself
    Op(
        "user-add",
        ("new_user",),
        ("user-add", "{new_user}"),
        ("POST", "/v1/users", {"user_id": "{new_user}"}),
        SUPER,
        201,
    ),
    Op("user-list", (), ("user-list",), ("GET", "/v1/users", None), SUPER),
    Op("get-user", ("user",), None, ("GET", "/v1/users/{user}", None), SELF_ONLY),
    Op(
        "user-remove",
        ("user",),
        ("user-remove", "{user}"),
        ("DELETE", "/v1/users/{user}", None),
        {SA: ("cannot_remove_self", OK), GRANTED: (ROLE, ROLE), NOGRANT: (ROLE, ROLE)},
    ),
    # A temporary password gates its user: the matrix resets throw-away users only.
    Op(
        "user-passwd",
        ("temp_user",),
        ("user-passwd", "{temp_user}"),
        ("POST", "/v1/users/{temp_user}/password", {}),
        SUPER,
    ),
    Op("me", (), None, ("GET", "/v1/users/me", None), BOTH_OK),
    # tokens
    Op(
        "token-issue",
        ("user",),
        ("token-issue", "{user}"),
        ("POST", "/v1/users/{user}/tokens", {}),
        SELF_ONLY,
        201,
    ),
    Op(
        "token-list",
        ("user",),
        ("token-list", "--user", "{user}"),
        ("GET", "/v1/users/{user}/tokens", None),
        SELF_ONLY,
    ),
    Op(
        "token-revoke",
        ("token",),
        ("token-revoke", "{token}"),
        ("DELETE", "/v1/tokens/{token}", None),
        SELF_ONLY,
        204,
    ),
    # grants
    Op(
        "grant-add",
        ("temp_user",),
        ("grant-add", "{temp_user}", "--client", "local", "--ports", "40000-40010"),
        (
            "POST",
            "/v1/grants",
            {
                "user_id": "{temp_user}",
                "client": "local",
                "listen_port_start": 40000,
                "listen_port_end": 40010,
            },
        ),
        SUPER,
        201,
    ),
    Op(
        "grant-list",
        ("user",),
        ("grant-list", "--user", "{user}"),
        ("GET", "/v1/grants?user={user}", None),
        SELF_ONLY,
    ),
    Op(
        "grant-revoke",
        ("grant",),
        ("grant-revoke", "{grant}"),
        ("DELETE", "/v1/grants/{grant}", None),
        SUPER,
    ),
    # owner caps: superadmin-only, even for your own
    Op(
        "owner-cap-list",
        (),
        ("owner-cap", "list", "local"),
        ("GET", "/v1/clients/local/owners", None),
        SUPER,
    ),
    Op(
        "owner-cap-set",
        ("user",),
        ("owner-cap", "set", "local", "{user}", "--concurrent-connections", "40"),
        ("PUT", "/v1/clients/local/owners/{user}/rate-limit", {"concurrent_connections": 40}),
        SUPER,
    ),
    Op(
        "owner-cap-get",
        ("capped",),
        ("owner-cap", "get", "local", "{capped}"),
        ("GET", "/v1/clients/local/owners/{capped}/rate-limit", None),
        SUPER,
    ),
    Op(
        "owner-cap-delete",
        ("capped",),
        ("owner-cap", "delete", "local", "{capped}"),
        ("DELETE", "/v1/clients/local/owners/{capped}/rate-limit", None),
        SUPER,
        204,
    ),
]

# user-remove of "other's" would remove carol; the superadmin removes a temp user instead.
OTHER_OVERRIDES = {"user-remove": "temp_user"}


def _cases() -> list[Any]:
    out = []
    for op in OPS:
        for actor in ACTORS:
            own, other = op.expect.get(actor, op.expect[GRANTED])
            for whose, expected in (("own", own), ("other", other)):
                if expected is NA or (whose == "other" and not op.uses):
                    continue
                for via in ("cli", "http", "cookie"):
                    if getattr(op, "http" if via == "cookie" else via) is None:
                        continue
                    out.append(
                        pytest.param(
                            op, actor, whose, expected, via, id=f"{op.name}-{actor}-{whose}-{via}"
                        )
                    )
    return out


@pytest.fixture(scope="module")
def world(server_module: ServerFactory, ports: PortAllocator) -> World:
    return make_world(server_module(shards=1), ports)


@pytest.fixture(scope="module")
def sessions(world: World) -> dict[str, str]:
    """A Web UI session (the cookie's value) per actor, logged in with its password."""
    out = {}
    for actor in ACTORS:
        resp = world.srv.http(
            "POST", "/v1/auth/login", {"user_id": actor, "password": PASSWORD}, token=None
        )
        assert resp.status == 200, resp
        out[actor] = resp.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    return out


def _fill(value: Any, names: dict[str, Any]) -> Any:
    if isinstance(value, str):
        if value.startswith("{") and value.endswith("}") and value[1:-1] in names:
            return names[value[1:-1]]  # keep ints ints, None None
        return value.format(**names)
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items() if _fill(v, names) is not None}
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    return value


def _names(world: World, op: Op, actor: str, whose: str) -> dict[str, Any]:
    owner = actor if whose == "own" else other_of(actor)
    names: dict[str, Any] = {}
    for key in op.uses:
        if key == "port":
            continue  # below
        maker = key
        if whose == "other" and op.name in OTHER_OVERRIDES and actor == SA:
            maker = OTHER_OVERRIDES[op.name]
        names[key] = MAKERS[maker](world, owner)
    if op.name == "push-rule":
        # bob has no grant: his "own" push aims at ports no grant covers.
        names["port"] = world.port_of(
            owner if whose == "other" else (SA if actor == NOGRANT else actor)
        )
        names["owner_opt"] = "--owner" if whose == "other" else ""
        names["owner_body"] = owner if whose == "other" else None
    return names


@pytest.mark.parametrize(("op", "actor", "whose", "expected", "via"), _cases())
def test_rbac_matrix(
    world: World, sessions: dict[str, str], op: Op, actor: str, whose: str, expected: str, via: str
) -> None:
    """``cookie``: the same HTTP request as a browser session sends it (cookie and
    ``X-Portunus-CSRF: 1``) must get the same answer as with a bearer token."""
    names = _names(world, op, actor, whose)
    token = world.tokens[actor]
    if via == "cli":
        assert op.cli is not None
        argv = [a for a in (_fill(a, names) for a in op.cli) if a != ""]
        if op.name == "push-rule" and whose == "other":
            argv.append(other_of(actor))  # the value of --owner
        res = world.srv.cli(*[str(a) for a in argv], "--format", "json", token=token)
        if expected == OK:
            assert res.code == 0, (argv, res.code, res.err)
        else:
            assert res.code == classify(expected)[1], (argv, res.code, res.err)
            assert f"error: {expected}: " in res.err, res.err
    else:
        assert op.http is not None
        method, path, body = op.http
        if via == "cookie":
            headers = {"Cookie": f"portunus_session={sessions[actor]}", "X-Portunus-CSRF": "1"}
            got = world.srv.http(
                method, _fill(path, names), _fill(body, names), token=None, headers=headers
            )
        else:
            got = world.srv.http(method, _fill(path, names), _fill(body, names), token=token)
        if expected == OK:
            assert got.status == op.ok_status, (method, path, got)
        else:
            assert (got.status, got.error_code) == (classify(expected)[0], expected), (
                method,
                path,
                got,
            )


def test_matrix_covers_every_route_and_user_verb() -> None:
    """A new route or verb must get a row: the table is the whole surface."""
    from starlette.routing import Route

    from portunus.config import Settings
    from portunus.web.app import create_app

    def generic(path: str) -> str:
        path = re.sub(r"^/v1/clients/[^/]+/owners", "/v1/clients/{id}/owners", path)
        path = re.sub(r"/owners/[^/]+/rate-limit$", "/owners/{owner}/rate-limit", path)
        path = re.sub(r"^/v1/clients/local$", "/v1/clients/{id}", path)  # the reserved node name
        for key in ("rule", "temp_user", "user", "token", "grant", "revoked_client", "client"):
            path = path.replace("{" + key + "}", "{id}")
        return path.split("?")[0]

    covered = {(op.http[0], generic(op.http[1])) for op in OPS if op.http}
    served = set()
    for r in create_app(Settings(data_dir="/nonexistent")).routes:
        if not getattr(r, "path", "").startswith("/v1/"):
            continue  # Web UI pages: no data of their own, they call /v1
        assert isinstance(r, Route)
        served |= {(m, r.path) for m in (r.methods or set()) - {"HEAD"}}
    # Routes every identity uses the same way, tested with sessions, SSE and health.
    elsewhere = {
        ("POST", "/v1/auth/login"),
        ("POST", "/v1/auth/logout"),
        ("POST", "/v1/auth/setup"),
        ("POST", "/v1/users/me/password"),
        ("GET", "/v1/rules/{id}/stats/stream"),
        ("GET", "/v1/health"),
        ("GET", "/v1/openapi.json"),
    }
    assert served - elsewhere <= covered, sorted(served - elsewhere - covered)
    verbs = {op.cli[0] for op in OPS if op.cli}
    assert {
        "user-add",
        "user-list",
        "user-remove",
        "user-passwd",
        "token-issue",
        "token-list",
        "token-revoke",
        "grant-add",
        "grant-list",
        "grant-revoke",
        "push-rule",
        "remove-rule",
        "rule-stats",
        "list-rules",
        "list-clients",
        "enroll-client",
        "rename-client",
        "revoke",
        "delete-client",
        "audit",
        "owner-cap",
        "update-rule",
        "retry-rule",
    } <= verbs
