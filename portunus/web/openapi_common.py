"""Building blocks of the OpenAPI document shared by its modules: references,
operations (``_op``), query parameters (``_q``) and the error responses every
operation may answer.  A leaf: it imports no other ``openapi_*`` module."""

from __future__ import annotations

from typing import Any

from portunus.schema.generate import REF

JSON = "application/json"
_REF = REF


def ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF + name}


ERROR_STATUSES: dict[str, str] = {
    "400": "Invalid request (`validation.*`, `bad_request`)",
    "401": "Missing or bad bearer token or session (`unauthenticated`, `invalid_login`, `invalid_setup_token`)",
    "403": "Not allowed (`role_required`, `not_owner`, `client_not_granted`, `protocol_not_granted`, "
    "`port_outside_grant`, `csrf_failed`, `password_change_required`)",
    "404": "No such object (`not_found`, `rule_not_found`, `client_not_found`, `user_not_found`, "
    "`grant_not_found`, `token_not_found`)",
    "405": "Method not allowed on this path (`method_not_allowed`)",
    "408": "The request (headers and body) was not complete within 10 s (`request_timeout`)",
    "409": "Conflict (`port_conflict`, `ambiguous_client`, `conflict.*`, `user_exists`, `cannot_remove_self`, "
    "`last_superadmin`)",
    "413": "Request body over 64 KiB (`validation.body_too_large`)",
    "422": "Client or capability state (`client_not_connected`, `activation_failed` with `rule`, "
    "`*_unsupported_by_client`)",
    "429": "Throttled (`throttled`, `rate_limited` with a Retry-After header)",
    "500": "Internal error (`internal`)",
    "503": "The control process is not answering, or the listener has too many open connections "
    "(`unavailable`)",
    "504": "The client did not acknowledge in time (`ack_timeout` with `rule`, which stays pending)",
}

_COMMON = ("401", "403", "405", "408", "429", "500", "503")
# ?since= / ?until=: RFC 3339, a Unix time, `now` or an age (30m, 1h30m, 2d), so
# not `format: date-time` (which would call `1h` invalid).
_WHEN = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "description": "An RFC 3339 time (2024-05-01T12:00:00Z), a Unix time, `now`, or an age like 1h30m",
}
_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
_CLIENT_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "A client_id or a client name",
}


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _op(
    op_id: str,
    summary: str,
    ok: str,
    ok_body: dict[str, Any] | None,
    errors: tuple[str, ...],
    *,
    params: list[dict[str, Any]] | None = None,
    body: str | None = None,
    public: bool = False,
    content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {ok: {"description": summary}}
    if content is not None:
        responses[ok]["content"] = content
    elif ok_body is not None:
        responses[ok]["content"] = _json(ok_body)
    statuses = errors if public else tuple(sorted(set(errors) | set(_COMMON)))
    for status in statuses:
        responses[status] = {"$ref": f"#/components/responses/E{status}"}
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(ref(body))}
    if public:
        op["security"] = []
    return op


_BOOL = {"type": "boolean", "default": False}
