"""Rule verbs of ``portunus-server`` kept out of server.py: ``retry-rule``, ``update-rule``.

Imported lazily through ``server.LAZY_VERBS``; importing it registers the verbs.
"""

from __future__ import annotations

import click

from portunus.bounds import RULE_ID
from portunus.cli import output
from portunus.cli.common import (
    OperatorContext,
    call_rule_and_echo,
    echo_json,
    format_option,
    hint_vars,
)
from portunus.cli.numbers import BoundedNumber
from portunus.cli.push_params import _target_entry
from portunus.errors import PortunusError
from portunus.rules import MAX_TARGETS, parse_target


@click.command("retry-rule")
@click.argument("rule_id", metavar="ID", type=BoundedNumber(RULE_ID))
@format_option
@click.pass_obj
def retry_rule(obj: OperatorContext, rule_id: int, fmt: str) -> None:
    """Try to bind a failed rule again now (e.g. after freeing its port).

    A failed rule is retried by itself too, after 1 s, then 2, 4, ... up to every
    30 s; this does not wait.  Exit 0 when the rule is active, 6 (activation_failed)
    when it still cannot be bound.

    \b
    Example:
      portunus-server retry-rule 7
    """
    hint_vars(rule_id=rule_id)
    # Still failed: the rule (with its failure_reason) is printed for scripts, like push-rule.
    call_rule_and_echo(obj, "rules.retry", {"id": rule_id}, fmt)


@click.command("update-rule")
@click.argument("rule_id", metavar="ID", type=BoundedNumber(RULE_ID))
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="HOST:PORT[@PRIO]",
    help=f"The rule's new targets (repeat, up to {MAX_TARGETS}); they replace the old list.",
)
@format_option
@click.pass_obj
def update_rule(obj: OperatorContext, rule_id: int, targets: tuple[str, ...], fmt: str) -> None:
    """Change a rule's targets in place (PUT /v1/rules/{id}).

    Same rule id, the listener never closes: open connections keep the target they
    were connected to, new connections use the new targets.

    \b
    Example:
      portunus-server update-rule 7 --target 10.0.0.6:80 --target 10.0.0.7:80@2
    """
    hint_vars(rule_id=rule_id)
    if not targets:
        raise PortunusError("validation.targets", "give at least one --target host:port@prio")
    parsed = [parse_target(t, "--target") for t in targets]
    if len(parsed) > MAX_TARGETS:
        raise PortunusError(
            "validation.targets", f"a rule takes at most {MAX_TARGETS} targets, got {len(parsed)}"
        )
    rule = obj.call("rules.update", {"id": rule_id, "targets": [_target_entry(t) for t in parsed]})
    if fmt == "json":
        echo_json(rule)
    else:
        click.echo(output.rule_line(rule))


VERBS = {c.name: c for c in (retry_rule, update_rule)}


def _register() -> None:
    from portunus.cli.server import cli

    for name, command in VERBS.items():
        if name not in cli.commands:
            cli.add_command(command, name)


_register()
