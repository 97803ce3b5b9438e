"""TOML text for the config files the processes under test read."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def standalone_toml(settings: dict[str, Any], rules: Iterable[dict[str, Any]]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    for rule in rules:
        lines += ["", "[[rule]]"] + [f"{k} = {toml_value(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"
