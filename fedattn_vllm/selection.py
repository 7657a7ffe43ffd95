"""Which of a participant's tokens take part at a layer (sparse K/V sharing, sparse local computation).

A selector picks `count` of a participant's `length` segment positions. The random
selector is the paper's: a uniform sample, drawn afresh for every (participant, layer),
reproducible from the session seed on any machine and in any process.
"""

from __future__ import annotations

import hashlib
import math
from typing import Protocol

import torch


def kept_count(length: int, ratio: float) -> int:
    """How many of `length` tokens a ratio in (0, 1] keeps: ceil, and at least one."""
    return min(length, max(1, math.ceil(round(ratio * length, 6))))


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from labelled parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TokenSelector(Protocol):
    """Chooses which segment positions are used; returns them sorted, int64."""

    def select(
        self, length: int, count: int, *, seed: int, participant: int, layer: int, purpose: str
    ) -> torch.Tensor: ...


class RandomSelector:
    """Uniform random subset, as in the FedAttn paper; independent per participant and layer."""

    def select(
        self, length: int, count: int, *, seed: int, participant: int, layer: int, purpose: str
    ) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(purpose, seed, participant, layer))
        return torch.randperm(length, generator=generator)[:count].sort().values


SELECTORS: dict[str, TokenSelector] = {"random": RandomSelector()}
