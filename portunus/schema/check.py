"""Validate a parsed body against its declaration, reporting *every* problem.

``validate(doc, RuleBody)`` checks ``doc`` against the JSON Schema generated from
the struct (``portunus.schema.generate``) and, when it conforms, converts it with
``msgspec`` into the typed struct.  The checker walks the subset of JSON Schema
the generated schemas use (type, enum, const, bounds, lengths, items, properties,
required, additionalProperties, allOf/anyOf/oneOf/not, local ``$ref``) and reports
each problem with the field it sits on, so an operator fixes a body in one round
trip (msgspec stops at the first); the first problem gives the error's
``code``/``message``/``field``.  Semantic checks (port overlap, SNI patterns,
range lengths) are not here: they need the rule as a whole.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from portunus.errors import ValidationError
from portunus.schema.generate import BY_NAME, REF, components

MAX_PROBLEMS = 50  # listed in one error answer; a hostile body can hold thousands
S = TypeVar("S", bound=msgspec.Struct)


@dataclass(frozen=True, slots=True)
class Problem:
    field: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {
            "field": _clip(self.field or "body"),
            "code": self.code,
            "message": _clip(self.message, 300),
        }


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _convert(doc: Any, struct: type[S]) -> S | None:
    try:
        return msgspec.convert(doc, struct, strict=True)
    except msgspec.ValidationError:
        return None


def problems(doc: Any, name: str) -> list[Problem]:
    """Every way ``doc`` fails the body named ``name``; empty when it conforms.

    msgspec checks types, ranges, lengths and keys in microseconds; only when it
    refuses does the schema walk run, to list every problem.  When it accepts, what
    is left are the shape rules a struct cannot say (``oneOf`` ...)."""
    schema = components()[name]
    if _convert(doc, BY_NAME[name]) is None:
        return check(doc, schema)
    out: list[Problem] = []
    _shapes(doc, schema, "", schema.get("x-error-code", "validation.body"), out)
    return out


def refuse(found: list[Problem]) -> ValidationError:
    """The error for ``found`` (not empty): the first problem, and the first 50 listed."""
    first = found[0]
    return ValidationError(
        first.code,
        _clip(first.message, 300),
        field=_clip(first.field or "body"),
        errors=[p.as_dict() for p in found[:MAX_PROBLEMS]],
    )


def validate(doc: Any, struct: type[S], path: str = "") -> S:
    """``doc`` as a ``struct``, or a ``ValidationError`` listing every problem;
    ``path`` names where ``doc`` sits in a larger document (``rate_limit``)."""
    name = struct.__name__
    typed = _convert(doc, struct)
    if typed is None:
        found = check(doc, components()[name], path)
        if not found:  # msgspec refused what the schema allows: not expected
            try:
                msgspec.convert(doc, struct, strict=True)
            except msgspec.ValidationError as exc:
                found = [_from_msgspec(str(exc), name, path)]
        raise refuse(found)
    found = []
    _shapes(doc, components()[name], path, "validation.body", found)
    if found:
        raise refuse(found)
    return typed


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _from_msgspec(message: str, name: str, prefix: str = "") -> Problem:
    """msgspec's first error as a ``Problem``: its path as the field, the code the
    schema declares there."""
    m = _AT.match(message)
    assert m is not None  # the pattern matches any text
    path, code = prefix, components()[name].get("x-error-code", "validation.body")
    node: dict[str, Any] | None = components()[name]
    for key, index in _STEP.findall(m.group("path") or ""):
        path = _join(path, int(index) if index else key)
        node = _resolve(node) if node is not None else None
        if node is not None:
            node = node.get("items") if index else node.get("properties", {}).get(key)
        if node is not None:
            code = _resolve(node).get("x-error-code", code)
    return Problem(path, code, f"{path or 'body'}: {m.group('what')}")


# ------------------------------------------------------------------ checker


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_ok(value: Any, wanted: str | list[str]) -> bool:
    # Deliberately stricter than JSON Schema: 8080.0 is not an integer port.
    actual = _json_type(value)
    allowed = [wanted] if isinstance(wanted, str) else wanted
    return actual in allowed or (actual == "integer" and "number" in allowed)


def _words(wanted: str | list[str]) -> str:
    names = {
        "object": "an object",
        "array": "a list",
        "string": "a string",
        "integer": "an integer",
        "number": "a number",
        "boolean": "true or false",
        "null": "null",
    }
    allowed = [wanted] if isinstance(wanted, str) else wanted
    return " or ".join(names.get(t, t) for t in allowed)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _resolve(s: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in s:
        target = s["$ref"]
        if not target.startswith(REF):
            raise KeyError(f"unsupported $ref {target}")
        s = components()[target[len(REF) :]]
    return s


def check(
    value: Any, schema: dict[str, Any], path: str = "", code: str = "validation.body"
) -> list[Problem]:
    """Every way ``value`` fails ``schema``; empty when it conforms."""
    out: list[Problem] = []
    _check(value, schema, path, code, out)
    return out


_SHAPE_KEYS = frozenset({"required", "not", "anyOf", "oneOf", "allOf"})


def _matches(value: Any, s: dict[str, Any], path: str) -> bool:
    """Whether ``value`` conforms to ``s``; shape-only schemas (``required``
    under ``not``/``anyOf``/``oneOf``, the declarations' ``oneOf`` rules) are
    decided without building problems: they run for every target of every push."""
    if not s.keys() <= _SHAPE_KEYS:
        return not check(value, s, path)
    if "required" in s and isinstance(value, dict) and not all(k in value for k in s["required"]):
        return False
    if "not" in s and _matches(value, s["not"], path):
        return False
    if "anyOf" in s and not any(_matches(value, sub, path) for sub in s["anyOf"]):
        return False
    if "oneOf" in s and sum(_matches(value, sub, path) for sub in s["oneOf"]) != 1:
        return False
    return all(_matches(value, sub, path) for sub in s.get("allOf", ()))


def _check(value: Any, s: dict[str, Any], path: str, code: str, out: list[Problem]) -> None:
    s = _resolve(s)
    code = s.get("x-error-code", code)
    where = path or "body"
    if "type" in s and not _type_ok(value, s["type"]):
        out.append(
            Problem(path, code, f"{where} must be {_words(s['type'])}, got {_json_type(value)}")
        )
        return
    if "const" in s and value != s["const"]:
        out.append(Problem(path, code, f"{where} must be {json.dumps(s['const'])}"))
        return
    if "enum" in s and not any(value == e and type(value) is type(e) for e in s["enum"]):
        choices = ", ".join(json.dumps(e) for e in s["enum"])
        out.append(
            Problem(path, code, f"{where} must be one of {choices}, got {json.dumps(value)}")
        )
        return
    kind = _json_type(value)
    if kind in ("integer", "number"):
        _check_bounds(value, s, path, code, out)
    elif kind == "string":
        if len(value) < s.get("minLength", 0):
            out.append(Problem(path, code, f"{where} must not be empty"))
        elif "maxLength" in s and len(value) > s["maxLength"]:
            out.append(Problem(path, code, f"{where} must be at most {s['maxLength']} characters"))
    elif kind == "array":
        if len(value) < s.get("minItems", 0):
            out.append(Problem(path, code, f"{where} needs at least {s['minItems']} item(s)"))
        elif "maxItems" in s and len(value) > s["maxItems"]:
            out.append(
                Problem(
                    path, code, f"{where} takes at most {s['maxItems']} items, got {len(value)}"
                )
            )
        if "items" in s:
            for i, item in enumerate(value):
                _check(item, s["items"], _join(path, i), code, out)
    elif kind == "object":
        _check_object(value, s, path, code, out)
    for sub in s.get("allOf", ()):
        _check(value, sub, path, code, out)
    _check_combinators(value, s, path, code, out)


def _check_bounds(
    value: float, s: dict[str, Any], path: str, code: str, out: list[Problem]
) -> None:
    where = path or "body"
    if not math.isfinite(value):  # only reachable past JSON (safejson refuses NaN/inf)
        out.append(Problem(path, code, f"{where} must be a finite number, got {value}"))
        return
    lo, hi = s.get("minimum"), s.get("maximum")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            out.append(Problem(path, code, f"{where} must be between {lo} and {hi}, got {value}"))
        elif lo is not None:
            out.append(Problem(path, code, f"{where} must be at least {lo}, got {value}"))
        else:
            out.append(Problem(path, code, f"{where} must be at most {hi}, got {value}"))
    elif "exclusiveMinimum" in s and value <= s["exclusiveMinimum"]:
        out.append(
            Problem(
                path, code, f"{where} must be greater than {s['exclusiveMinimum']}, got {value}"
            )
        )


def _check_object(
    value: dict[str, Any], s: dict[str, Any], path: str, code: str, out: list[Problem]
) -> None:
    props: dict[str, Any] = s.get("properties", {})
    extra = s.get("additionalProperties", True)
    # A shape rule such as {"required": [...]} has nothing to say about the values.
    for key, item in value.items() if props or extra is not True else ():
        if key in props:
            _check(item, props[key], _join(path, key), code, out)
        elif extra is False:
            template = s.get("x-unknown-field-message", "unknown field {field}")
            name = _join(path, key)
            out.append(
                Problem(
                    name,
                    s.get("x-unknown-field-code", "validation.unknown_field"),
                    template.format(field=json.dumps(name)),
                )
            )
        elif isinstance(extra, dict):
            _check(item, extra, _join(path, key), code, out)
    for key in s.get("required", ()):
        if key not in value:
            sub_code = _resolve(props[key]).get("x-error-code", code) if key in props else code
            out.append(Problem(_join(path, key), sub_code, f"{_join(path, key)} is required"))


def _shapes(value: Any, s: dict[str, Any], path: str, code: str, out: list[Problem]) -> None:
    """Only the combinators (``oneOf``, ``anyOf``, ``not``, ``allOf``) under ``s``:
    everything else was checked by msgspec already."""
    s = _resolve(s)
    if not _has_shapes(s):
        return
    code = s.get("x-error-code", code)
    # The order of ``_check``'s report: the values (in the document's key order),
    # then allOf, then this level's combinators; the first problem is the answer.
    if isinstance(value, dict):
        props = s.get("properties", {})
        for key, item in value.items():
            if key in props:
                _shapes(item, props[key], _join(path, key), code, out)
    elif isinstance(value, list) and "items" in s:
        for i, item in enumerate(value):
            _shapes(item, s["items"], _join(path, i), code, out)
    for sub in s.get("allOf", ()):
        _shapes(value, sub, path, code, out)
    _check_combinators(value, s, path, code, out)


_SHAPED: dict[int, bool] = {}  # id of a (cached, never freed) component node → has combinators


def _has_shapes(s: dict[str, Any]) -> bool:
    """Whether a combinator sits in ``s`` or below it (``$ref`` followed)."""
    known = _SHAPED.get(id(s))
    if known is None:
        _SHAPED[id(s)] = False  # a recursive $ref adds nothing new
        subs = [*s.get("properties", {}).values(), *s.get("allOf", ())]
        if "items" in s:
            subs.append(s["items"])
        known = any(k in s for k in ("oneOf", "anyOf", "not")) or any(
            _has_shapes(_resolve(sub)) for sub in subs
        )
        _SHAPED[id(s)] = known
    return known


def _check_combinators(
    value: Any, s: dict[str, Any], path: str, code: str, out: list[Problem]
) -> None:
    where = path or "body"
    message = s.get("x-error-message")
    if message and path:
        message = f"{path}: {message}"
    if "oneOf" in s and sum(_matches(value, sub, path) for sub in s["oneOf"]) != 1:
        out.append(
            Problem(path, code, message or f"{where} does not match exactly one allowed shape")
        )
    if "anyOf" in s and not any(_matches(value, sub, path) for sub in s["anyOf"]):
        out.append(Problem(path, code, message or f"{where} does not match any allowed shape"))
    if "not" in s and _matches(value, s["not"], path):
        out.append(Problem(path, code, message or f"{where} has a shape that is not allowed"))
