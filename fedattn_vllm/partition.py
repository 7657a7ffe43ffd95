"""How the evaluation splits a few-shot prompt (exemplars, question) among N participants.

All policies work on token ids and keep prompt order, so the concatenation of the
segments is always exemplars + question: N = 1 (or H = 1) is centralised inference.
- TokAg: the whole prompt cut into N equal token chunks.
- SemAg: whole exemplars dealt in order to the N participants; the question goes to the last.
- TokEx: participants 1..N-1 cut the exemplar tokens into equal chunks; N holds the question.
- SemEx: participants 1..N-1 get whole exemplars in order; N holds only the question.
"""

from __future__ import annotations

from enum import Enum
from itertools import chain

Tokens = list[int]


class SplitPolicy(str, Enum):
    TOK_AG = "TokAg"
    SEM_AG = "SemAg"
    TOK_EX = "TokEx"
    SEM_EX = "SemEx"


class PartitionError(ValueError):
    """The prompt cannot be split as asked (e.g. fewer exemplars than participants)."""


def _even_chunks(items: list, n: int) -> list[list]:
    """n contiguous chunks whose sizes differ by at most one, the larger ones first."""
    size, extra = divmod(len(items), n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + size + (i < extra))
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def _flat(parts: list[Tokens]) -> Tokens:
    return list(chain.from_iterable(parts))


def split_prompt(
    exemplars: list[Tokens], question: Tokens, num_participants: int, policy: SplitPolicy | str
) -> list[Tokens]:
    """The N participants' segments (token ids), in prompt order."""
    policy = SplitPolicy(policy)
    n = num_participants
    if n < 1:
        raise PartitionError(f"num_participants must be >= 1, got {n}")
    if not question:
        raise PartitionError("the question is empty")
    if n == 1:
        return [_flat(exemplars) + list(question)]
    if policy is SplitPolicy.TOK_AG:
        segments = _even_chunks(_flat(exemplars) + list(question), n)
    elif policy is SplitPolicy.SEM_AG:
        if len(exemplars) < n - 1:
            raise PartitionError(f"SemAg needs >= {n - 1} exemplars for {n} participants, got {len(exemplars)}")
        groups = _even_chunks(exemplars, n) if len(exemplars) >= n else [[e] for e in exemplars] + [[]]
        segments = [_flat(g) for g in groups]
        segments[-1] = segments[-1] + list(question)
    elif policy is SplitPolicy.TOK_EX:
        segments = _even_chunks(_flat(exemplars), n - 1) + [list(question)]
    else:  # SEM_EX
        if len(exemplars) < n - 1:
            raise PartitionError(f"SemEx needs >= {n - 1} exemplars for {n} participants, got {len(exemplars)}")
        segments = [_flat(g) for g in _even_chunks(exemplars, n - 1)] + [list(question)]
    if any(not s for s in segments):
        raise PartitionError(f"{policy.value} with {n} participants leaves a participant without tokens")
    return segments
