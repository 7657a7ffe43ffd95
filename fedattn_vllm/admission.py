"""Gang admission: a session enters the engine only when all its participants prefill in the next step.

FedAttn couples a session's requests: participant n's prefill reads 1..n-1's K/V and a
generator's decode reads everyone's. Admitting whole sessions, only when the engine's
next step has room for every segment (tokens, sequences, K/V blocks reserved up to each
request's maximum length), makes that ordering hold by construction: vLLM schedules
running decodes first and then waiting requests in arrival order, and never preempts
when the blocks a request can grow to are reserved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineCapacity:
    max_batched_tokens: int  # tokens one step may compute
    max_seqs: int  # requests one step may hold
    kv_blocks: int  # paged K/V blocks in the cache
    block_size: int  # tokens per block


@dataclass(frozen=True)
class SessionDemand:
    prompt_tokens: tuple[int, ...]  # per request: its segment length
    max_tokens: tuple[int, ...]  # per request: tokens it may generate

    @property
    def requests(self) -> int:
        return len(self.prompt_tokens)

    def blocks(self, block_size: int) -> list[int]:
        """K/V blocks each request can grow to."""
        return [math.ceil((p + m) / block_size) for p, m in zip(self.prompt_tokens, self.max_tokens)]


class GangAdmission:
    """Books what admitted requests hold; answers whether a whole session fits the next step.

    A session is first reserved (its blocks and sequence slots held, its prompt tokens
    counted against every step's budget) and then started (its requests handed to vLLM);
    its prompt stops counting once a step has run after the start. Colocated mode starts
    at once (`try_admit`); federated engines start when every engine of the session has
    reserved its part.
    """

    def __init__(self, capacity: EngineCapacity):
        self.capacity = capacity
        self._blocks: dict[str, int] = {}  # live request id -> reserved blocks
        self._unprefilled: dict[object, tuple[int, int, bool]] = {}  # key -> (prompt tokens, requests, started)

    def why_never(self, demand: SessionDemand) -> str | None:
        """Why the session could not run even in an empty engine (None: it can)."""
        cap = self.capacity
        if sum(demand.prompt_tokens) > cap.max_batched_tokens:
            return f"{sum(demand.prompt_tokens)} prompt tokens exceed max_num_batched_tokens={cap.max_batched_tokens}"
        if demand.requests > cap.max_seqs:
            return f"{demand.requests} participants exceed max_num_seqs={cap.max_seqs}"
        if sum(demand.blocks(cap.block_size)) > cap.kv_blocks:
            return f"needs {sum(demand.blocks(cap.block_size))} K/V blocks, the cache has {cap.kv_blocks}"
        return None

    def try_reserve(self, key: object, demand: SessionDemand, request_ids: list[str]) -> bool:
        """Hold room for the session's requests if one step can prefill them beside everything else held."""
        cap = self.capacity
        prompt_tokens = sum(t for t, _, _ in self._unprefilled.values())
        unprefilled = sum(r for _, r, _ in self._unprefilled.values())
        decoding = len(self._blocks) - unprefilled  # one token each per step
        blocks = demand.blocks(cap.block_size)
        fits = (
            sum(demand.prompt_tokens) + prompt_tokens + decoding <= cap.max_batched_tokens
            and demand.requests + len(self._blocks) <= cap.max_seqs
            and sum(blocks) + sum(self._blocks.values()) <= cap.kv_blocks
        )
        if fits:
            self._blocks.update(zip(request_ids, blocks))
            self._unprefilled[key] = (sum(demand.prompt_tokens), demand.requests, False)
        return fits

    def start(self, key: object) -> None:
        """The reserved session's requests were handed to the engine; the next step prefills them."""
        tokens, requests, _ = self._unprefilled[key]
        self._unprefilled[key] = (tokens, requests, True)

    def try_admit(self, key: object, demand: SessionDemand, request_ids: list[str]) -> bool:
        """Reserve and start at once."""
        if not self.try_reserve(key, demand, request_ids):
            return False
        self.start(key)
        return True

    def stepped(self) -> None:
        """The engine ran a step: every started session is prefilled."""
        self._unprefilled = {k: v for k, v in self._unprefilled.items() if not v[2]}

    def cancel(self, key: object, request_ids: list[str]) -> None:
        """Drop a session's reservation and requests, whatever stage it reached."""
        self._unprefilled.pop(key, None)
        for request_id in request_ids:
            self._blocks.pop(request_id, None)

    def finished(self, request_id: str) -> None:
        self._blocks.pop(request_id, None)

    @property
    def live_requests(self) -> int:
        return len(self._blocks)
