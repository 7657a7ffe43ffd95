"""Sync-layer attention math: partial attention with log-sum-exp, exact LSE merge, sparse K/V gather."""

from kernels.reference import gather_tokens, merge_attention, partial_attention

__all__ = ["gather_tokens", "merge_attention", "partial_attention"]
