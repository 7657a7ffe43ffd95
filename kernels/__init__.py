"""Sync-layer attention math: partial attention with log-sum-exp, exact LSE merge, sparse K/V gather, int8 K/V."""

from kernels.quant import dequantize_int8, quantize_int8
from kernels.reference import gather_tokens, merge_attention, partial_attention

__all__ = ["dequantize_int8", "gather_tokens", "merge_attention", "partial_attention", "quantize_int8"]
