"""Which of a participant's tokens take part at a layer (sparse K/V sharing, sparse local computation).

A selector picks `count` of a participant's `length` segment positions. The random
selector is the paper's: a uniform sample, drawn afresh for every (participant, layer),
reproducible from the session seed on any machine and in any process. The key-norm
selector (beyond the paper) is importance-based: it reads the participant's own keys at
that layer, so it runs where they are, at the publisher, and costs no extra bytes.
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
    """Chooses which segment positions are used; returns them sorted, int64.

    needs_keys: the choice depends on `keys`, the participant's keys at the layer (length, H_kv, D).
    """

    needs_keys: bool

    def select(
        self, length: int, count: int, *, seed: int, participant: int, layer: int, purpose: str,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class RandomSelector:
    """Uniform random subset, as in the FedAttn paper; independent per participant and layer."""

    needs_keys = False

    def select(
        self, length: int, count: int, *, seed: int, participant: int, layer: int, purpose: str,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(purpose, seed, participant, layer))
        return torch.randperm(length, generator=generator)[:count].sort().values


class KeyNormSelector:
    """The `count` tokens with the smallest key L2 norm (mean over KV heads).

    Low-norm keys tend to receive the most attention (Devoto et al., 2024, "A Simple and
    Effective L2 Norm-Based Strategy for KV Cache Compression"). RoPE is a rotation, so the
    norm is the same before and after it. Ties go to the earlier position.
    """

    needs_keys = True

    def select(
        self, length: int, count: int, *, seed: int, participant: int, layer: int, purpose: str,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if keys is None or keys.shape[0] != length:
            raise ValueError(f"key_norm selection needs the participant's {length} keys at layer {layer}")
        norms = keys.float().norm(dim=-1).mean(dim=-1)  # (length,)
        return norms.argsort(stable=True)[:count].sort().values.cpu()


SELECTORS: dict[str, TokenSelector] = {"random": RandomSelector(), "key_norm": KeyNormSelector()}
