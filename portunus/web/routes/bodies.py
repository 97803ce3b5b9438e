"""JSON request bodies: size limit, parsing, and a check against their declaration.

The bodies are declared once in ``portunus.schema`` (the OpenAPI document's
request schemas are generated from the same declarations); ``portunus.schema.check``
reports *every* problem with the field it sits on.  Semantic checks (port
overlap, SNI patterns, range lengths) stay in the control process.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from portunus import safejson
from portunus.errors import PortunusError
from portunus.schema.check import Problem, check, problems, refuse
from portunus.text import is_ascii_digits

__all__ = ["BodyTooLarge", "Problem", "check", "parse_json", "read_body", "read_json"]

# The largest legitimate body, a rule with 8 targets and every field at its
# longest, is 3,929 bytes pretty-printed (tests/unit/web/test_web_limits.py
# measures it): 64 KiB leaves room for growth while what an anonymous peer can
# make the web process hold stays small (web.limits.BodyLimit applies the same
# limit to every route).
MAX_BODY = 64 * 1024


class BodyTooLarge(PortunusError):
    """Over ``MAX_BODY``: 413 rather than the 400 of other ``validation.*`` codes."""

    def __init__(self) -> None:
        super().__init__(
            "validation.body_too_large",
            f"request body exceeds {MAX_BODY} bytes (64 KiB)",
            limit=MAX_BODY,
        )

    @property
    def http_status(self) -> int:
        return 413


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The raw body, refusing early on Content-Length and while streaming otherwise."""
    declared = request.headers.get("content-length")
    if declared is not None and is_ascii_digits(declared) and int(declared) > limit:
        raise BodyTooLarge()
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise BodyTooLarge()
    return bytes(buf)


def parse_json(raw: bytes) -> Any:
    """UTF-8 JSON (RFC 8259), finite numbers, nested at most ``MAX_JSON_DEPTH`` deep."""
    if not raw.strip():
        raise PortunusError("validation.body", "request body is empty; send a JSON object")
    try:
        return safejson.loads(raw)
    except safejson.JsonRejected as exc:
        raise PortunusError("validation.json", f"request body is not valid JSON: {exc}") from None


async def read_json(request: Request, schema_name: str) -> dict[str, Any]:
    """Read, parse and check a body against the declaration named ``schema_name``."""
    return validate_body(parse_json(await read_body(request)), schema_name)


def validate_body(doc: Any, schema_name: str) -> dict[str, Any]:
    """Check an already-parsed body; the Web UI's forms come through here too, so a
    form shows the same codes and messages as the API.  The body is passed on as the
    client sent it (the control process validates it again into its typed struct)."""
    found = problems(doc, schema_name)
    if found:
        raise refuse(found)
    assert isinstance(doc, dict)  # the schemas of request bodies are all objects
    return doc
