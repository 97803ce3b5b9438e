"""Field types for the body declarations: ranges from ``portunus.bounds``, error codes.

``x-error-code`` on a field's schema names the ``validation.*`` code reported for
a bad value under it (children inherit it); ``x-error-message`` is the message of
a failed ``oneOf`` shape check; ``x-unknown-field-code``/``-message`` apply to keys
an object does not allow.  ``portunus.schema.check`` reads all four.  A field
that may be absent but never ``null`` is ``T | UnsetType = UNSET``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from msgspec import Meta

from portunus.bounds import PORT, Bound


def code(error_code: str, **extra: Any) -> dict[str, Any]:
    """The ``extra_json_schema`` of a field whose bad values are ``error_code``."""
    return {"x-error-code": error_code, **extra}


def within(bound: Bound, error_code: str, description: str | None = None) -> Meta:
    """The constraints of ``bound`` (the one table of ranges) and the field's code;
    annotate ``int`` for integer bounds, ``float`` otherwise."""
    lo: float = int(bound.lo) if bound.integer else bound.lo
    hi: float = int(bound.hi) if bound.integer else bound.hi
    if bound.lo_open:
        return Meta(gt=lo, le=hi, description=description, extra_json_schema=code(error_code))
    return Meta(ge=lo, le=hi, description=description, extra_json_schema=code(error_code))


def text(
    error_code: str, max_length: int, min_length: int = 1, description: str | None = None
) -> Meta:
    """A string of ``min_length``-``max_length`` characters."""
    return Meta(
        min_length=min_length,
        max_length=max_length,
        description=description,
        extra_json_schema=code(error_code),
    )


def about(description: str | None = None, error_code: str | None = None) -> Meta:
    """Only a description and/or an error code (for unions and enums)."""
    return Meta(description=description, extra_json_schema=code(error_code) if error_code else None)


Port = Annotated[int, within(PORT, "validation.port")]
ProtocolName = Literal["tcp", "udp"]
Protocol = Annotated[ProtocolName, about(error_code="validation.protocol")]
ProxyVersion = Literal["v1", "v2"]
# The same choices as plain tuples, for the CLI's options and the TOML loader.
PROTOCOLS: tuple[str, ...] = get_args(ProtocolName)
PROXY_VERSIONS: tuple[str, ...] = get_args(ProxyVersion)
PROXY = about(
    "Send a PROXY protocol header of this version to the target (TCP rules only).",
    "validation.proxy_protocol",
)
