"""Sync-layer attention math: partial attention with log-sum-exp, exact LSE merge, sparse K/V gather, K/V quantisation."""

from kernels.fused import partial_attention as fused_partial_attention
from kernels.quant import dequantize_groups, dequantize_int8, quantize_groups, quantize_int8
from kernels.reference import decode_attention, gather_tokens, merge_attention, partial_attention

__all__ = ["decode_attention", "dequantize_groups", "dequantize_int8", "fused_partial_attention", "gather_tokens",
           "merge_attention", "partial_attention", "quantize_groups", "quantize_int8"]
