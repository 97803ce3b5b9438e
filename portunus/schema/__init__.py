"""Every request body, declared once as a typed ``msgspec`` struct.

The declarations (``rule``, ``requests``, ``wire``) are the single source of a
body's shape: the OpenAPI ``components.schemas`` are generated from them
(``generate``), every boundary validates against them (``check.validate``: the
web process for HTTP bodies and Web UI forms, the control process for the
``rules.push`` / ``rules.update`` params, the edge for a rule it receives), and
the numbers in them come from ``portunus.bounds``.  What a struct cannot say —
cross-field rules such as ``port_start <= port_end``, range sizes, PROXY protocol
on TCP only — stays in ``portunus.rules.build_rule`` and ``control.rule_body``.
"""

from portunus.schema.check import Problem, check, validate

__all__ = ["Problem", "check", "validate"]
