"""A session as the coordinator holds it: the plan (who may publish and see what), the participants'
credentials or bound keys, the payloads published, byte counts, and the party-side sites' progress."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from fedattn_vllm.config import FedAttnPlan
from fedattn_vllm.exchange import PayloadKind
from fedattn_vllm.federated.wire import WirePayload

LIVENESS_S = 30.0  # a participant still computing that sent nothing for this long is presumed gone


@dataclass
class Session:
    """One open session at the coordinator; the plan's visibility rule applied per payload kind."""

    plan: FedAttnPlan  # who publishes where and who may see whom: the plan's own rule
    credentials: list[bytes]  # per participant; empty when `keys` binds them
    keys: list[bytes] | None = None  # per participant: the CURVE public key (Z85) its connection must have
    # (participant, layer, kind) -> K/V or a generator's questions, maybe sealed
    kv: dict[tuple[int, int, PayloadKind], WirePayload] = field(default_factory=dict)
    # (participant, "up" | "down") -> bytes on the wire; payload bytes (tensors only) likewise
    wire_bytes: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    payload_bytes: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    announced: dict[int, tuple[int, int, bytes]] = field(default_factory=dict)  # participant -> (length, prefix, terms)
    left: set[int] = field(default_factory=set)  # participants done (party-side sites): freed when all are
    seen: dict[int, float] = field(default_factory=dict)  # participant -> when it last sent anything
    last_used: float = field(default_factory=time.monotonic)

    def silent(self, participants, now: float) -> list[int]:
        """Those of `participants` not heard from within LIVENESS_S (a running site says `alive` every few s)."""
        return [p for p in participants if now - self.seen.get(p, float("-inf")) > LIVENESS_S]

    def may_publish(self, participant: int, layer: int, kind: PayloadKind) -> bool:
        """The plan's rule, where segment lengths are not known: K/V at its publish layers; a generator's
        questions at a layer where some publisher may choose by them."""
        if kind is PayloadKind.KV:
            return self.plan.publishes(participant, layer)
        return bool(self.plan.question_readers(participant, layer, [None] * self.plan.num_participants))

    def may_fetch(self, viewer: int, source: int, layer: int, kind: PayloadKind) -> bool:
        if kind is PayloadKind.KV:
            return self.plan.reads(viewer, source, layer)
        return source in self.plan.asks(viewer, layer)

    def byte_counts(self) -> dict:
        """{"wire_bytes"|"payload_bytes": {"up"|"down": {participant: bytes}}} (sizes, which every party may know)."""
        return {"wire_bytes": _by_participant(self.wire_bytes), "payload_bytes": _by_participant(self.payload_bytes)}


def _by_participant(counts: dict[tuple[int, str], int]) -> dict[str, dict[int, int]]:
    """{"up": {participant: bytes}, "down": {...}}"""
    rows: dict[str, dict[int, int]] = {"up": {}, "down": {}}
    for (participant, direction), size in counts.items():
        rows[direction][participant] = size
    return rows
