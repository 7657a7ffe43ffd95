"""Worker-side session state: the resolved plan, segment lengths and each generator's own sync-layer K/V."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from fedattn_vllm.config import FedAttnConfig, FedAttnPlan
from fedattn_vllm.exchange import KV, InProcessKVExchange, KVExchange

METADATA_KEY = "fedattn"  # SamplingParams.extra_args[METADATA_KEY] marks a participant request


@dataclass
class SessionState:
    session_id: str
    plan: FedAttnPlan
    lengths: list[int]
    own_kv: dict[tuple[int, int], KV] = field(default_factory=dict)  # (generator, layer) -> K/V so far
    error: str | None = None  # set when the session failed; its rows are then left alone

    def fail(self, message: str) -> None:
        """Mark the session failed (first error wins) and drop its K/V; the driver aborts its requests."""
        if self.error is None:
            self.error = message
        self.own_kv.clear()

    @property
    def prompt_len(self) -> int:
        return sum(self.lengths)

    def offset(self, participant: int) -> int:
        return sum(self.lengths[:participant])

    def sources(self, participant: int, layer: int, prefill: bool) -> list[int]:
        """Participants whose K/V `participant` attends to at `layer` (earlier ones in prefill)."""
        return [
            m for m in range(len(self.lengths))
            if m != participant and self.plan.publishes(m, layer) and (m < participant or not prefill)
        ]

    def keeps_own(self, participant: int, layer: int) -> bool:
        """Whether a generator must keep its own K/V at `layer` for its decode steps."""
        return participant in self.plan.generators and bool(self.sources(participant, layer, prefill=False))

    def append_own(self, participant: int, layer: int, kv: KV) -> KV:
        """Own K/V at `layer` up to and including `kv` (this step's tokens)."""
        previous = self.own_kv.get((participant, layer))
        if previous is not None:
            kv = (torch.cat([previous[0], kv[0]]), torch.cat([previous[1], kv[1]]))
        self.own_kv[participant, layer] = kv
        return kv


class SessionRegistry:
    """Sessions this worker has seen, keyed by id, and the exchange they publish to."""

    def __init__(self, exchange: KVExchange):
        self.exchange = exchange
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionState] = {}

    def get_or_create(self, metadata: dict) -> SessionState:
        session_id = metadata["session"]
        with self._lock:
            state = self._sessions.get(session_id)
            if state is None:
                config = FedAttnConfig(**metadata["config"])
                plan = config.resolve(metadata["num_layers"], len(metadata["lengths"]))
                state = self._sessions[session_id] = SessionState(session_id, plan, list(metadata["lengths"]))
            return state

    def failed(self, session_ids) -> dict[str, str]:
        """The error of each of `session_ids` that failed."""
        with self._lock:
            states = [self._sessions.get(i) for i in session_ids]
        return {s.session_id: s.error for s in states if s is not None and s.error is not None}

    def release(self, session_id: str) -> None:
        """Free the session's own and published K/V (idempotent)."""
        with self._lock:
            self._sessions.pop(session_id, None)
        self.exchange.release(session_id)

    def __len__(self) -> int:
        return len(self._sessions)


REGISTRY = SessionRegistry(InProcessKVExchange())  # colocated mode: one per engine process
