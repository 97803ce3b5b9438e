"""The messages of the supervisor channel, one class per kind (docs/rpc.md).

Every frame between the supervisor and a child (shard, control, web, metrics, the
edge client's link) is one of these ``msgspec`` structs: ``type`` names the kind on
the wire and the fields are checked when a frame is decoded (framing.Channel), so a
receiver dispatches on the class and never meets a missing key or a wrong type.
Both ends are forked from one build, so the classes are the whole protocol; a kind
that no receiver reads does not exist.

Rules travel as ``Rule.to_wire()`` objects (``WireRule``); their fields are checked
where they become a ``Rule`` (``Rule.from_wire``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

PROTOCOL_VERSION = 1

# Rule.to_wire(): id, protocol, listen ports, targets, ... (checked by Rule.from_wire).
WireRule = Annotated[dict[str, Any], msgspec.Meta(title="rule")]
# {owner: rate_limit} (docs/owner-caps.md); the titles name the shapes in docs/rpc.md.
OwnerCapsMap = Annotated[dict[str, dict[str, int]], msgspec.Meta(title="{owner: rate_limit}")]
SettingsMap = Annotated[dict[str, Any], msgspec.Meta(title="{key: value}")]
RuleId = Annotated[str, msgspec.Meta(title="id")]  # the rule id as a string


class Message(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=False):
    """A frame of the supervisor channel; subclasses name their ``type`` tag."""


class RuleOutcome(msgspec.Struct, kw_only=True):
    """Where one rule ended up after an ``apply``/``sync``: bound, or failed and why."""

    state: Literal["active", "failed"]
    reason: str | None = None


Outcomes = dict[RuleId, RuleOutcome]


def outcomes(results: dict[str, dict[str, Any]]) -> Outcomes:
    """The rule book's ``{id: {"state", "reason"}}`` as typed outcomes."""
    return {
        rid: RuleOutcome(state=r["state"], reason=r.get("reason")) for rid, r in results.items()
    }


# ------------------------------------------------------------ any child -> supervisor


class Up(Message, tag="up"):
    """The child has fully started; one that dies before this is a boot failure."""


# ------------------------------------------------------------ supervisor -> rule source


class Hello(Message, tag="hello"):
    """Sent to the rule source when its channel opens."""

    version: int
    shards: int


class Applied(Message, tag="applied"):
    """The answer to ``apply``/``sync`` ``seq``: the upserted/synced rules' outcomes."""

    seq: int
    results: Outcomes


class Retried(Message, tag="retried"):
    """Unasked: failed rules that bound on a later try (supervisor/retry.py)."""

    results: Outcomes


class Removed(Message, tag="removed"):
    """Removed rules whose connections drained on every shard (or that were never bound)."""

    ids: list[RuleId]


class Settings(Message, tag="settings"):
    """Reloaded settings, to every service child that reads them (``takes_settings``
    in portunus/process_trees.py; supervisor/reload.py)."""

    settings: SettingsMap


# ------------------------------------------------------------ rule source -> supervisor


class Apply(Message, tag="apply"):
    """Add or replace ``upsert`` and remove ``remove``; answered by ``applied``."""

    seq: int
    upsert: list[WireRule]
    remove: list[RuleId]


class Sync(Message, tag="sync"):
    """The full desired rule set: unchanged rules keep their connections, missing ones
    are added, extra ones drained; answered by ``applied``."""

    seq: int
    rules: list[WireRule]


class OwnerCaps(Message, tag="owner_caps"):
    """The node's full set of owner caps; not answered.  Source -> supervisor, and the
    supervisor passes it on to every shard (before the rules when a shard starts)."""

    caps: OwnerCapsMap


# ------------------------------------------------------------ supervisor -> shard


class Config(Message, tag="config"):
    """The shard's settings; sent first, and again on every reload (the shard knows
    its index from its entry point)."""

    settings: SettingsMap


class Listeners(Message, tag="listeners"):
    """Listening sockets: ``add`` keys arrive with one fd each (at most
    framing.MAX_FDS_PER_FRAME per frame), ``remove`` keys are closed."""

    add: list[str] = []
    remove: list[str] = []


class Rules(Message, tag="rules"):
    """Rules to serve (``upsert``) and to drain (``remove``)."""

    upsert: list[WireRule]
    remove: list[RuleId]


# ------------------------------------------------------------ shard -> supervisor


class Ready(Message, tag="ready"):
    """The shard's loop runs (a shard's ``up``)."""


class Heartbeat(Message, tag="heartbeat"):
    """Every second from the shard's loop, so a wedged loop is noticed."""


class Drained(Message, tag="drained"):
    """Removed rules whose last connection on this shard closed."""

    ids: list[RuleId]


AnyMessage = (
    Up
    | Hello
    | Applied
    | Retried
    | Removed
    | Settings
    | Apply
    | Sync
    | OwnerCaps
    | Config
    | Listeners
    | Rules
    | Ready
    | Heartbeat
    | Drained
)

# Who sends what to whom: the sections of docs/rpc.md, which a test holds to this.
DIRECTIONS: dict[str, tuple[type[Message], ...]] = {
    "supervisor → rule source": (Hello, Applied, Retried, Removed, Settings),
    "rule source → supervisor": (Apply, Sync, OwnerCaps, Up),
    "supervisor → web, metrics": (Settings,),
    "web, metrics → supervisor": (Up,),
    "supervisor → shard": (Config, Listeners, Rules, OwnerCaps),
    "shard → supervisor": (Ready, Heartbeat, Drained),
}

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(AnyMessage)


def encode(msg: Message) -> bytes:
    """The JSON body of one frame."""
    return _ENCODER.encode(msg)


def decode(body: bytes) -> Message:
    """One frame's body as its message class; ``msgspec.ValidationError`` (a
    ``msgspec.DecodeError``) says what is wrong and where (``$.seq``)."""
    msg: Message = _DECODER.decode(body)
    return msg


def tag(cls: type[Message]) -> str:
    """The ``type`` on the wire of a message class."""
    return str(cls.__struct_config__.tag)


def as_dict(msg: Message) -> dict[str, Any]:
    """A message in its wire form, ``type`` included (for logs, and tests that play
    one end of a channel)."""
    out: dict[str, Any] = msgspec.to_builtins(msg)
    return out


def from_dict(raw: dict[str, Any]) -> Message:
    """The message whose wire form is ``raw``, checked like a received frame
    (``msgspec.ValidationError`` otherwise)."""
    msg: Message = msgspec.convert(raw, AnyMessage)
    return msg
