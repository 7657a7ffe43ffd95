"""Which of a participant's tokens take part at a layer (sparse K/V sharing, sparse local computation).

A selector picks `count` of a participant's `length` segment positions. The random
selector is the paper's: a uniform sample, drawn afresh for every (participant, layer),
reproducible from the session seed on any machine and in any process. The key-norm
selector (beyond the paper) is importance-based: it reads the participant's own keys at
that layer, so it runs where they are, at the publisher, and costs no extra bytes. The
question selector (beyond the paper) keeps what the generators' questions look at: it
scores the publisher's keys with the generators' queries of the same layer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Protocol

import torch

# combine(score, "sum" | "max"): a per-token score (length,) over this process's attention heads, combined with
# the other tensor-parallel ranks' (each holds some of the heads); None where every head is in this process.
HeadCombine = Callable[[torch.Tensor, str], torch.Tensor]


def kept_count(length: int, ratio: float) -> int:
    """How many of `length` tokens a ratio in (0, 1] keeps: ceil, and at least one."""
    return min(length, max(1, math.ceil(round(ratio * length, 6))))


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from labelled parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TokenSelector(Protocol):
    """Chooses which segment positions are used; returns them sorted, int64.

    needs_keys: the choice depends on `keys`, the participant's post-RoPE keys at the layer (length, H_kv, D).
    needs_queries: it also depends on `queries` (rows, H, D), the generators' question queries at the
    layer (post-RoPE, times the attention scale; see QUESTION_ROWS). Both hold this process's heads; `combine`
    makes a score over them one over all heads, so that every tensor-parallel rank chooses the same tokens.
    """

    needs_keys: bool
    needs_queries: bool

    def select(
        self, length: int, count: int, *, seed: int, participant: int, layer: int, purpose: str,
        keys: torch.Tensor | None = None, queries: torch.Tensor | None = None, combine: HeadCombine | None = None,
    ) -> torch.Tensor: ...


class RandomSelector:
    """Uniform random subset, as in the FedAttn paper; independent per participant and layer."""

    needs_keys = needs_queries = False

    def select(
        self, length: int, count: int, *, seed: int, participant: int, layer: int, purpose: str,
        keys: torch.Tensor | None = None, queries: torch.Tensor | None = None, combine: HeadCombine | None = None,
    ) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(purpose, seed, participant, layer))
        return torch.randperm(length, generator=generator)[:count].sort().values


class KeyNormSelector:
    """The `count` tokens with the smallest key L2 norm (summed over KV heads).

    Low-norm keys tend to receive the most attention (Devoto et al., 2024, "A Simple and
    Effective L2 Norm-Based Strategy for KV Cache Compression"). RoPE is a rotation, so the
    norm is the same before and after it. Ties go to the earlier position.
    """

    needs_keys, needs_queries = True, False

    def select(
        self, length: int, count: int, *, seed: int, participant: int, layer: int, purpose: str,
        keys: torch.Tensor | None = None, queries: torch.Tensor | None = None, combine: HeadCombine | None = None,
    ) -> torch.Tensor:
        _check_keys("key_norm", keys, length, layer)
        norms = keys.float().norm(dim=-1).sum(dim=-1)  # (length,)
        if combine is not None:
            norms = combine(norms, "sum")
        return norms.argsort(stable=True)[:count].sort().values.cpu()


QUESTION_ROWS = 32  # a generator's last segment tokens (its question) whose queries score the others' tokens
QUESTION_POOL = 15  # a token scores the best of the 15 around it: an answer is copied as a whole span


def question_bytes(generator_tokens: int, heads: int, head_dim: int, element_size: int) -> int:
    """A generator's question queries at one layer, as they travel to a publisher (engine dtype)."""
    return min(QUESTION_ROWS, generator_tokens) * heads * head_dim * element_size


class QuestionSelector:
    """The `count` tokens the generators' questions attend to most (beyond the paper; after SnapKV).

    Each question query (row, head) attends over the publisher's segment alone (softmax over its
    tokens, grouped-query heads sharing their KV head); a token's score is its largest probability
    under any row and head, after a max-pool over QUESTION_POOL neighbours, so that a value stays
    with the words that name it. Max, not sum: one head that looks the fact up outweighs many that
    rest on filler. Ties go to the earlier position. With no question (no other generator) it keeps
    the key-norm choice.
    """

    needs_keys = needs_queries = True

    def select(
        self, length: int, count: int, *, seed: int, participant: int, layer: int, purpose: str,
        keys: torch.Tensor | None = None, queries: torch.Tensor | None = None, combine: HeadCombine | None = None,
    ) -> torch.Tensor:
        _check_keys("question", keys, length, layer)
        if queries is None or queries.shape[0] == 0:
            return SELECTORS["key_norm"].select(length, count, seed=seed, participant=participant, layer=layer,
                                                purpose=purpose, keys=keys, combine=combine)
        heads, kv_heads = queries.shape[1], keys.shape[1]
        q = queries.float().transpose(0, 1)  # (H, rows, D)
        k = keys.float().transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)  # (H, length, D)
        probs = torch.softmax(q @ k.transpose(1, 2), dim=-1)  # (H, rows, length)
        pooled = torch.nn.functional.max_pool1d(probs, QUESTION_POOL, stride=1, padding=QUESTION_POOL // 2)
        score = pooled.amax(dim=(0, 1))  # (length,)
        if combine is not None:
            score = combine(score, "max")
        return score.argsort(descending=True, stable=True)[:count].sort().values.cpu()


def _check_keys(name: str, keys: torch.Tensor | None, length: int, layer: int) -> None:
    if keys is None or keys.shape[0] != length:
        raise ValueError(f"{name} selection needs the participant's {length} keys at layer {layer}")


SELECTORS: dict[str, TokenSelector] = {
    "random": RandomSelector(), "key_norm": KeyNormSelector(), "question": QuestionSelector(),
}
