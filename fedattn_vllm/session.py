"""What a FedAttn session is and what it gives back: the types every driver shares (offline API, server, federated).

A session is one answer over a prompt split among participants; its result holds the
generators' outputs, what it cost (tokens, sync layers, bytes), or why it failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedattn_vllm.admission import SessionDemand
from fedattn_vllm.config import FedAttnConfig, FedAttnPlan


class FedAttnSessionError(ValueError):
    """A session is malformed; `field` names the offending part."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class FedAttnSession:
    segments: Sequence[str | Sequence[int]]  # participant n's private text or token ids, in prompt order
    config: FedAttnConfig = field(default_factory=FedAttnConfig)
    sampling_params: object | None = None  # vllm.SamplingParams for the generators (default: greedy, 64)
    # Public text or token ids (e.g. the system prompt) before participant 0: every participant computes it
    # and sees it at every layer; never exchanged (beyond the paper). None or empty: no prefix.
    public_prefix: str | Sequence[int] | None = None


@dataclass
class GeneratorOutput:
    participant: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None = None  # vLLM's per-token {token id: Logprob}, when sampling_params asked for them


@dataclass
class Piece:
    """What a generator added since it last reported (streaming): text, token ids and, if asked for, their logprobs."""

    text: str
    token_ids: list[int]
    logprobs: list | None = None  # vLLM's {token id: Logprob} per new token

    def to_wire(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "logprobs": logprobs_to_wire(self.logprobs)}

    @classmethod
    def from_wire(cls, value) -> Piece:
        """A piece an engine sent; anything malformed is a ValueError (it came over the network)."""
        if not (isinstance(value, dict) and isinstance(value.get("text"), str) and isinstance(value.get("token_ids"), list)
                and all(type(t) is int for t in value["token_ids"])):
            raise ValueError("a piece is {text: str, token_ids: [int], logprobs}")
        return cls(value["text"], value["token_ids"], logprobs_from_wire(value.get("logprobs"), value["token_ids"]))

    def after(self, text_sent: int, tokens_sent: int) -> Piece:
        """The part of a whole output (this piece) beyond what was already reported."""
        return Piece(self.text[text_sent:], self.token_ids[tokens_sent:],
                     None if self.logprobs is None else self.logprobs[tokens_sent:])


def logprobs_to_wire(logprobs) -> list | None:
    """vLLM's per-token logprobs ({token id: Logprob} per position) as plain lists, for msgpack:
    [[token id, logprob, rank, decoded token], ...] per position."""
    if logprobs is None:
        return None
    return [[[t, lp.logprob, lp.rank, lp.decoded_token] for t, lp in position.items()] for position in logprobs]


def logprobs_from_wire(value, token_ids: list[int]) -> list[dict] | None:
    """`logprobs_to_wire`'s lists back as vLLM's structure: one position per generated token, each holding that
    token; anything else is a ValueError (it came over the network)."""
    from vllm.logprobs import Logprob

    if value is None:
        return None
    if not isinstance(value, list) or len(value) != len(token_ids):
        raise ValueError(f"logprobs: {len(token_ids)} positions expected")
    positions = []
    for token, position in zip(token_ids, value):
        entries = {}
        for entry in position if isinstance(position, list) else [None]:
            if not (isinstance(entry, list) and len(entry) == 4 and type(entry[0]) is int
                    and isinstance(entry[1], float) and entry[1] <= 0.0 and (entry[2] is None or type(entry[2]) is int)
                    and (entry[3] is None or isinstance(entry[3], str))):
                raise ValueError("logprobs: each entry is [token id, logprob <= 0 (-inf allowed), rank, decoded token]")
            entries[entry[0]] = Logprob(entry[1], entry[2], entry[3])
        if token not in entries:
            raise ValueError("logprobs: a position without its generated token")
        positions.append(entries)
    return positions


@dataclass
class SessionCost:
    tokens: list[int]  # segment length per participant
    sync_layers: tuple[int, ...]
    published_bytes: list[int]  # K/V payload measured at the exchange, per participant
    received_bytes: list[int]
    prefix_tokens: int = 0  # the public prefix, computed by every participant (never exchanged)
    published_wire_bytes: list[int] | None = None  # federated: whole messages on the wire (payload + framing)
    received_wire_bytes: list[int] | None = None


@dataclass
class SessionResult:
    outputs: dict[int, GeneratorOutput]  # by generator index (empty if the session failed)
    cost: SessionCost
    error: str | None = None  # why the session failed; other sessions of the call are unaffected
    error_field: str | None = None  # the offending input, when the session was refused for one
    wall_s: float | None = None  # federated: from submission to the last participant's completion


@dataclass
class SessionRun:
    """One session's participants hosted by one engine, planned (`FederatedLLM.plan_run`) and on their way
    through it (`fedattn_vllm.driver`)."""

    session_id: str
    prompts: dict[int, list[int]]  # hosted participant -> its segment's token ids
    prefix: list[int]  # the public prefix's token ids (every participant's request starts with them)
    num_participants: int
    sampling: object  # the generators' vllm.SamplingParams
    plan: FedAttnPlan  # the session's config, resolved once for the model's depth and N
    demand: SessionDemand  # of the hosted participants, in `prompts` order
    started: bool = False
    finished: dict[int, object] = field(default_factory=dict)  # participant -> final RequestOutput
    error: str | None = None

    def request_id(self, n: int) -> str:
        return f"{self.session_id}:{n}"

    @property
    def request_ids(self) -> list[str]:
        return [self.request_id(n) for n in self.prompts]

    @property
    def done(self) -> bool:
        return self.error is not None or len(self.finished) == len(self.prompts)
