"""The typed messages of federated mode: every header from outside is decoded into one of these.

A header that does not decode (wrong type, out-of-range integer, unknown operation or
field, too long a string or list) is malformed: the receiver drops it and counts it. The
bounds are the edge's range checks; semantic checks (a credential, a session's plan) come
after, in the receiver.

  coordinator requests  Open, Close, Stats, Counters (admin key); Publish, Fetch, and for party-side
                        sites Describe, Announce, Leave, Alive (a participant's credential or CURVE key)
  engine control        Submit, Go, Abort, Info, Status, Shutdown (the engine's control key)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

MAX_SIZE = 4096  # bound on a session's layers and participants
MAX_TOKENS = 1 << 20  # bound on a segment's or a public prefix's token ids
MAX_WAIT_S = 600.0  # the longest a fetch may wait for a publish, or a participant for a peer
WIRE_DTYPES = ("float32", "bfloat16", "float16", "int8", "uint8")

Index = Annotated[int, Meta(ge=0, lt=MAX_SIZE)]  # a participant or a layer
Count = Annotated[int, Meta(ge=1, le=MAX_SIZE)]  # layers or participants of a session
SessionId = Annotated[str, Meta(min_length=1, max_length=128)]
Secret = Annotated[bytes, Meta(min_length=1, max_length=256)]  # admin and control keys, credentials
CurveKey = Annotated[bytes, Meta(min_length=40, max_length=40)]  # a CURVE public key, Z85 text
WaitS = Annotated[float, Meta(ge=0.0, le=MAX_WAIT_S)]
TokenId = Annotated[int, Meta(ge=0, lt=1 << 31)]
Segment = Annotated[str, Meta(max_length=16 * MAX_TOKENS)] | Annotated[list[TokenId], Meta(max_length=MAX_TOKENS)]
TensorSpec = tuple[Literal[WIRE_DTYPES], Annotated[list[Annotated[int, Meta(ge=1, le=1 << 31)]], Meta(max_length=8)]]
TensorSpecs = Annotated[list[TensorSpec], Meta(min_length=1, max_length=8)]
Config = Annotated[dict[str, Any], Meta(max_length=64)]  # FedAttnConfig's fields; the config validates them


class _Message(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, frozen=True):
    """A header tagged by its `op`; a field it does not declare makes it malformed."""


# -- coordinator requests ------------------------------------------------------------------
class Open(_Message, tag="open"):
    admin_key: Secret
    session: SessionId
    config: Config
    num_layers: Count
    num_participants: Count
    # Each participant bound to its site's CURVE public key instead of a credential: only a connection
    # authenticated with that key may act for it, and the opener holds no credential of anyone's.
    participant_keys: Annotated[list[CurveKey], Meta(max_length=MAX_SIZE)] | None = None


class Close(_Message, tag="close"):
    admin_key: Secret
    session: SessionId


class Stats(_Message, tag="stats"):
    admin_key: Secret
    session: SessionId


class Counters(_Message, tag="counters"):
    """The coordinator's own counters (sessions held, messages dropped and why)."""

    admin_key: Secret


Kind = Literal["kv", "questions"]  # exchange.PayloadKind: a participant's K/V, or a generator's question queries


class Publish(_Message, tag="publish"):
    session: SessionId
    participant: Index
    layer: Index
    tensors: TensorSpecs
    kind: Kind = "kv"
    credential: Secret | None = None  # none in a session whose participants are bound to CURVE keys
    sealed: bool = False  # the frames are sealed with the session's key (sealing.py)


class Fetch(_Message, tag="fetch"):
    session: SessionId
    participant: Index  # the viewer
    source: Index
    layer: Index
    kind: Kind = "kv"
    credential: Secret | None = None
    wait_s: WaitS = 0.0


class Describe(_Message, tag="describe"):
    """A participant asks for its session's config, depth and size (party-side sites: the opener is elsewhere)."""

    session: SessionId
    participant: Index
    credential: Secret | None = None


class Announce(_Message, tag="announce"):
    """A participant's segment length, its public prefix's length and its session terms' digest; answered once
    every participant has announced, with every length (positions need them), or refused if they disagree."""

    session: SessionId
    participant: Index
    length: Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
    prefix_len: Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
    terms: Annotated[bytes, Meta(max_length=64)] = b""
    credential: Secret | None = None
    wait_s: WaitS = 0.0


class Leave(_Message, tag="leave"):
    """A participant is done (answered once every participant is: its K/V stays until then; if the others are
    still computing when `wait_s` runs out, answered `pending`: leave again) or failed (the session ends now);
    answered with every participant's byte counts."""

    session: SessionId
    participant: Index
    credential: Secret | None = None
    failed: bool = False
    reason: Annotated[str, Meta(max_length=512)] = ""
    wait_s: WaitS = 0.0


class Alive(_Message, tag="alive"):
    """A participant still computing (a party-side site's heartbeat while its part runs): its session does not
    expire, and the participants already done keep waiting for it."""

    session: SessionId
    participant: Index
    credential: Secret | None = None


CoordinatorRequest = Open | Close | Stats | Counters | Publish | Fetch | Describe | Announce | Leave | Alive
ADMIN_REQUESTS = (Open, Close, Stats, Counters)


# -- engine control ------------------------------------------------------------------------
class Submit(_Message, tag="submit"):
    key: Secret
    session: SessionId
    num_participants: Count
    segments: Annotated[dict[Index, Segment], Meta(min_length=1, max_length=MAX_SIZE)]
    # None: the session binds that participant to this engine's CURVE key (a party-side site)
    credentials: Annotated[dict[Index, Secret | None], Meta(min_length=1, max_length=MAX_SIZE)]
    config: Config
    sampling: Annotated[bytes, Meta(max_length=1 << 20)]  # msgpack of vllm.SamplingParams, or of None
    wait_s: WaitS
    public_prefix: Segment | None = None
    seal_key: Annotated[bytes, Meta(min_length=32, max_length=32)] | None = None  # K/V sealed end to end


class GoItem(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    session: SessionId
    lengths: Annotated[list[Annotated[int, Meta(ge=1, le=MAX_TOKENS)]], Meta(min_length=1, max_length=MAX_SIZE)]


class Go(_Message, tag="go"):
    key: Secret
    sessions: Annotated[list[GoItem], Meta(max_length=1 << 16)]


class Abort(_Message, tag="abort"):
    key: Secret
    session: SessionId


class Info(_Message, tag="info"):
    key: Secret
    ref: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0


class Status(_Message, tag="status"):
    key: Secret
    ref: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0


class Shutdown(_Message, tag="shutdown"):
    key: Secret


EngineCommand = Submit | Go | Abort | Info | Status | Shutdown
