"""The frames of the edge link, one class per kind (docs/edge.md, docs/rpc.md).

The link is spoken by an edge client and a server that may be of different builds,
so the classes keep the frame field names of the first release; a field added
later has a default (an older peer leaves it out), unknown fields are ignored and a
frame of a kind this build does not know decodes as ``Unknown``, which every
receiver ignores: a newer peer can add kinds without breaking an older one.

A frame is checked when it becomes one of these classes (``parse``): a field of
the wrong type is a ``WireError`` that names it.  Fields a peer may send in bad
shape without the link being at fault stay loose (``Any``) and are checked item by
item by their receiver: one malformed rule in a ``sync`` fails that rule alone
(edge/link.py), and the server bounds what an authenticated client reports
(control/fleet/remote_link.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

# Loose fields: any JSON on the wire, checked by the receiver; the title is the shape
# a well-behaved peer sends (docs/rpc.md shows it).
Text = Annotated[Any, msgspec.Meta(title="str")]
Number = Annotated[Any, msgspec.Meta(title="number")]
Names = Annotated[Any, msgspec.Meta(title="[str]")]
Counters = Annotated[Any, msgspec.Meta(title="{id: counters}")]
Caps = Annotated[Any, msgspec.Meta(title="{owner: rate_limit}")]
Results = Annotated[dict[str, Any], msgspec.Meta(title="{id: {state, reason}}")]
WireRules = Annotated[list[Any], msgspec.Meta(title="[rule]")]
Ids = Annotated[list[Any], msgspec.Meta(title="[id]")]


class Frame(msgspec.Struct, tag_field="type", kw_only=True):
    """A frame of the edge link; subclasses name their ``type`` tag."""


# ------------------------------------------------------------ client -> server


class Enroll(Frame, tag="enroll"):
    """First frame of an enrollment: redeem a one-time code."""

    code: Text = None  # checked by the gateway (bounded, audited refusal)
    version: Text = None


class Hello(Frame, tag="hello"):
    """First frame of a session: authenticate and advertise capabilities."""

    token: Text = None  # checked by the gateway: a bad one is ``error: unauthenticated``
    client_id: Text = None
    version: Text = None
    capabilities: Names = None  # names of features the client runs (gateway filters)


class Ping(Frame, tag="ping"):
    """Either way: keeps a quiet link alive; any frame proves the peer is there."""


class Stats(Frame, tag="stats"):
    """The client's per-rule counters, sent when they changed."""

    rules: Counters = None  # bounded by the server
    run: Text = None  # the client supervisor's run id: counters restart with it


class Applied(Frame, tag="applied"):
    """Outcomes of a ``sync``/``apply`` (``seq``), or unasked (``seq`` null) for a
    failed rule that bound later."""

    results: Results  # entries of another shape are skipped
    seq: int | None = None  # null: unasked


class Removed(Frame, tag="removed"):
    """Removed rules whose connections drained on the client."""

    ids: Ids


# ------------------------------------------------------------ server -> client


class Enrolled(Frame, tag="enrolled"):
    """The answer to a good ``enroll``: the client's identity and link token."""

    client_id: str
    client_name: str
    token: str


class Error(Frame, tag="error", omit_defaults=True):
    """A refusal; the server closes the link after it (``busy``: retry later).
    ``retry_after`` is sent only with ``busy``."""

    code: str
    message: str = ""
    retry_after: float | None = None


class Welcome(Frame, tag="welcome", omit_defaults=True):
    """The answer to a good ``hello``; the cadence fields are checked by the client
    and sent only when set (``ping_secs`` and ``dead_after_secs`` on a quiet link)."""

    client_id: str
    client_name: str
    heartbeat_secs: Number = None
    ping_secs: Number = None  # only to a client that advertised ``quiet_link``
    dead_after_secs: Number = None


class Sync(Frame, tag="sync"):
    """The client's full desired rule set; answered by ``applied``."""

    seq: int
    rules: WireRules  # each checked alone by the client


class Apply(Frame, tag="apply"):
    """Add or replace ``upsert``, remove ``remove``; answered by ``applied``."""

    seq: int
    upsert: WireRules = []
    remove: Ids = []


class OwnerCaps(Frame, tag="owner_caps"):
    """The client's full set of owner caps; checked by the client, not answered."""

    caps: Caps


class Renamed(Frame, tag="renamed"):
    """The operator renamed this client."""

    client_name: str


class Unknown(Frame, tag="?"):
    """A frame of a kind this build does not know (from a newer peer): ignored."""

    kind: str = ""


AnyFrame = (
    Enroll
    | Hello
    | Ping
    | Stats
    | Applied
    | Removed
    | Enrolled
    | Error
    | Welcome
    | Sync
    | Apply
    | OwnerCaps
    | Renamed
)

# Who sends what: the edge-link section of docs/rpc.md, which a test holds to this.
DIRECTIONS: dict[str, tuple[type[Frame], ...]] = {
    "client → server": (Enroll, Hello, Ping, Stats, Applied, Removed),
    "server → client": (Enrolled, Error, Welcome, Sync, Apply, OwnerCaps, Renamed, Ping),
}

KNOWN = {str(cls.__struct_config__.tag) for cls in DIRECTIONS["client → server"]} | {
    str(cls.__struct_config__.tag) for cls in DIRECTIONS["server → client"]
}

_ENCODER = msgspec.json.Encoder()


class FrameInvalid(ValueError):
    """A frame of a known kind whose fields do not fit it; ``str()`` names the field."""


def parse(raw: dict[str, Any]) -> Frame:
    """The frame whose JSON object is ``raw`` (its ``type`` is a string)."""
    kind = raw["type"]
    if kind not in KNOWN:
        return Unknown(kind=str(kind)[:64])
    try:
        frame: Frame = msgspec.convert(raw, AnyFrame)
    except msgspec.ValidationError as exc:
        raise FrameInvalid(f"{kind} frame: {exc}") from None
    return frame


def kind(frame: Frame) -> str:
    """The frame's ``type``, for logs and refusals (an unknown one's as received)."""
    if isinstance(frame, Unknown):
        return frame.kind
    return str(frame.__struct_config__.tag)


def encode(frame: Frame) -> bytes:
    """The JSON body of one frame."""
    return _ENCODER.encode(frame)
