"""The K/V exchange: the only coupling between a session's participants.

A participant publishes its (possibly sparse) sync-layer K/V once per layer and reads
what it may see; with question selection a generator also publishes its question queries
at the layers where a publisher chooses by them. Transports differ by deployment; this module holds the interface and
the in-process one (colocated mode). Bytes are counted here, where tensors move.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum

import torch

KV = tuple[torch.Tensor, torch.Tensor]  # (T, H_kv, D) keys and values
Payload = tuple[torch.Tensor, ...]  # what a participant publishes: K and V, or their wire encoding (kv_wire.py)


class PayloadKind(str, Enum):
    """What a published payload holds; each kind has its own slots (participant, layer)."""

    KV = "kv"  # a participant's sync-layer K/V
    QUESTIONS = "questions"  # a generator's question queries (question selection: the publishers choose by them)

    @property
    def noun(self) -> str:
        return "K/V" if self is PayloadKind.KV else "question queries"


class KVExchangeError(RuntimeError):
    """Foreign K/V that a participant needs is not (or no longer) available."""


@dataclass
class ExchangeStats:
    published_bytes: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    received_bytes: dict[int, int] = field(default_factory=lambda: defaultdict(int))


class KVExchange(ABC):
    """Subclasses call `_count_published` / `_count_received` where tensors move.

    counted: the payload kinds whose bytes count (a tensor-parallel rank whose K/V heads replicate another
    rank's counts only its questions: the replica's K/V are the same bytes, counted once).
    """

    def __init__(self, counted: frozenset[PayloadKind] = frozenset(PayloadKind)) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, ExchangeStats] = {}
        self.counted = counted

    def _count_published(self, session: str, participant: int, kv: Payload, kind: PayloadKind) -> None:
        if kind in self.counted:
            with self._lock:
                self._stats.setdefault(session, ExchangeStats()).published_bytes[participant] += kv_nbytes(kv)

    def _count_received(self, session: str, viewer: int, kv: Payload, kind: PayloadKind) -> None:
        if kind in self.counted:
            with self._lock:
                self._stats.setdefault(session, ExchangeStats()).received_bytes[viewer] += kv_nbytes(kv)

    def stats(self, session: str) -> ExchangeStats:
        """K/V payload bytes each participant published and received in `session` (through this exchange)."""
        with self._lock:
            return self._stats.get(session, ExchangeStats())

    @abstractmethod
    def publish(self, session: str, participant: int, layer: int, kv: Payload,
                kind: PayloadKind = PayloadKind.KV) -> None:
        """Make `participant`'s K/V (or questions) at `layer` available to its session (once per layer and kind)."""

    @abstractmethod
    def fetch(self, session: str, viewer: int, source: int, layer: int,
              kind: PayloadKind = PayloadKind.KV) -> Payload:
        """`source`'s K/V (or questions) at `layer`, read by `viewer`; raises KVExchangeError if absent."""

    @abstractmethod
    def release(self, session: str) -> None:
        """Free everything the session published (idempotent)."""

    def abandon(self, session: str, reason: str) -> None:
        """This worker failed the session (`reason`), so nothing may wait on its part of it any longer. Nothing to
        do but where workers share a session's payloads: tensor-parallel ranks (`federated.ranks`)."""


def kv_nbytes(kv: Payload) -> int:
    return sum(t.numel() * t.element_size() for t in kv)


class InProcessKVExchange(KVExchange):
    """Every participant lives in this process (one engine): K/V are shared by reference."""

    def __init__(self, counted: frozenset[PayloadKind] = frozenset(PayloadKind)) -> None:
        super().__init__(counted)
        self._kv: dict[str, dict[tuple[int, int, PayloadKind], Payload]] = {}

    def publish(self, session: str, participant: int, layer: int, kv: Payload,
                kind: PayloadKind = PayloadKind.KV) -> None:
        with self._lock:
            store = self._kv.setdefault(session, {})
            if (participant, layer, kind) in store:
                raise KVExchangeError(f"session {session}: participant {participant} published its {kind.noun} "
                                      f"at layer {layer} twice")
            store[participant, layer, kind] = kv
        self._count_published(session, participant, kv, kind)

    def fetch(self, session: str, viewer: int, source: int, layer: int,
              kind: PayloadKind = PayloadKind.KV) -> Payload:
        with self._lock:
            kv = self._kv.get(session, {}).get((source, layer, kind))
            if kv is None:
                raise KVExchangeError(
                    f"session {session}: participant {viewer} needs participant {source}'s {kind.noun} at layer "
                    f"{layer}, not published"
                )
        self._count_received(session, viewer, kv, kind)
        return kv

    def release(self, session: str) -> None:
        with self._lock:
            self._kv.pop(session, None)
            self._stats.pop(session, None)

    def live_sessions(self) -> int:
        with self._lock:
            return len(self._kv)
