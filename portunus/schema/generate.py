"""JSON Schema (OpenAPI 3.1 ``components.schemas``) generated from the declarations.

``msgspec.json.schema_components`` writes the schemas; this module only tidies
them into the form the published document has always had (``type: [X, "null"]``
rather than ``anyOf`` with null, no ``title``) and adds what each struct declares
in ``SCHEMA_EXTRA`` (shape rules, error codes, descriptions).  The boundary checker
and the OpenAPI document read the same dict, so what is published is what is
enforced.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from portunus.schema import requests, rule, standalone, wire

REF = "#/components/schemas/"

BODIES: tuple[type[msgspec.Struct], ...] = (
    rule.RuleBody,
    rule.RuleUpdate,
    rule.OwnerCaps,
    requests.ClientEnrollmentBody,
    requests.ClientRename,
    requests.LoginBody,
    requests.SetupBody,
    requests.OwnPasswordBody,
    requests.UserBody,
    requests.PasswordBody,
    requests.TokenBody,
    requests.GrantBody,
)
# Referenced from the bodies above; generated with them.
_NESTED: tuple[type[msgspec.Struct], ...] = (rule.RateLimit, rule.TargetBody)
# Checked like the bodies but not published: the edge link's rule, a TOML [[rule]].
_WIRE: tuple[type[msgspec.Struct], ...] = (
    wire.WireRule,
    wire.WireTarget,
    standalone.StandaloneRule,
)
BY_NAME: dict[str, type[msgspec.Struct]] = {t.__name__: t for t in BODIES + _NESTED + _WIRE}


def _merge_null(node: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, Y, {"type": "null"}]`` of plain types → one node with a type list
    (one error message instead of "does not match any allowed shape"); a ``$ref`` or
    null becomes a plain ``$ref`` when the component itself admits null."""
    options = node.get("anyOf")
    if not isinstance(options, list):
        return node
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    refs = [o for o in options if "$ref" in o]
    if len(refs) == 1 and len(options) == 2 and {"type": "null"} in options:
        target = BY_NAME[refs[0]["$ref"][len(REF) :]]
        if "null" in getattr(target, "SCHEMA_EXTRA", {}).get("type", ()):
            return {**refs[0], **rest}
    if any("$ref" in o or "anyOf" in o for o in options):
        return node
    merged: dict[str, Any] = {}
    types: list[str] = []
    enum: list[Any] | None = None
    nullable = False
    for option in options:
        if option == {"type": "null"}:
            nullable = True
        elif "enum" in option:
            enum = [*(enum or []), *option["enum"]]
        else:
            types.append(option["type"])
            for key, value in option.items():
                if key != "type" and merged.setdefault(key, value) != value:
                    return node  # the same keyword twice with different values

    if enum is not None and not types:
        merged["enum"] = enum + [None] * nullable
    elif enum is not None:
        return node  # an enum beside other types: keep anyOf
    else:
        types += ["null"] * nullable
        merged["type"] = types[0] if len(types) == 1 else types
    return {**merged, **rest}


def _tidy(node: Any) -> Any:
    if isinstance(node, list):
        return [_tidy(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _tidy(v) for k, v in node.items() if k != "title"}
    return _merge_null(node)


@functools.cache
def components() -> dict[str, dict[str, Any]]:
    """``{struct name: JSON Schema}`` of every declaration (bodies, what they
    reference, the wire rule)."""
    _, raw = msgspec.json.schema_components(BODIES + _WIRE, ref_template=REF + "{name}")
    out: dict[str, dict[str, Any]] = {}
    for name, schema in raw.items():
        struct = BY_NAME[name]
        tidy = _tidy(schema)
        extra = dict(getattr(struct, "SCHEMA_EXTRA", {}))
        message = extra.get("x-unknown-field-message")
        if isinstance(message, str) and "{known}" in message:
            known = ", ".join(struct.__struct_fields__)
            extra["x-unknown-field-message"] = message.replace("{known}", known)
        tidy.setdefault("x-error-code", "validation.body")
        tidy.update(extra)
        out[name] = tidy
    return out


def published() -> dict[str, dict[str, Any]]:
    """The components of the OpenAPI document: the request bodies."""
    names = {t.__name__ for t in BODIES + _NESTED}
    return {k: v for k, v in components().items() if k in names}


def schema(name: str) -> dict[str, Any]:
    """One component by name (read-only use)."""
    return components()[name]
