"""Sync-layer attention math: partial attention with log-sum-exp, exact LSE merge, sparse K/V gather, K/V quantisation
(grouped low-bit codes on a C kernel beside the torch reference, `kernels.quant_native`)."""

from kernels.fused import partial_attention as fused_partial_attention
from kernels.quant_native import (  # C kernels, else torch's
    all_finite, dequantize_groups, dequantize_int8_kv, dequantize_kv, quantize_groups, quantize_int8, quantize_kv)
from kernels.reference import concat_kv, decode_attention, gather_tokens, merge_attention, partial_attention

__all__ = ["all_finite", "concat_kv", "decode_attention", "dequantize_groups", "dequantize_int8_kv", "dequantize_kv",
           "fused_partial_attention", "gather_tokens", "merge_attention", "partial_attention", "quantize_groups",
           "quantize_int8", "quantize_kv"]
