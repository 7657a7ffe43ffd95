"""What a FedAttn session is and what it gives back: the types every driver shares (offline API, server, federated).

A session is one answer over a prompt split among participants; its result holds the
generators' outputs, what it cost (tokens, sync layers, bytes), or why it failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedattn_vllm.config import FedAttnConfig


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
