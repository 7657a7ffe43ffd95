"""Partial attention on torch's fused SDPA kernels, which also return the log-sum-exp.

Same contract as `kernels.reference.partial_attention` (the judge: tests/test_kernels.py holds
the two equal), without materialising the (T_q, T_k) score matrix per head: on the CPU torch's
flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu`). Inputs are taken in
fp32, as the reference computes, so both give the same values up to summation order. Devices
without such a kernel here use the reference.
"""

from __future__ import annotations

import torch

from kernels.reference import allowed_keys, partial_attention as reference_partial_attention


def partial_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, *, causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.reference.partial_attention`, fused where the device has a kernel: out (T_q, H, D), lse (T_q, H)."""
    t_q, heads, dim = query.shape
    t_k, kv_heads, _ = key.shape
    if query.device.type != "cpu" or t_k == 0 or t_q == 0:
        return reference_partial_attention(query, key, value, scale, causal=causal, mask=mask)
    square_causal = causal and mask is None and t_q == t_k  # the kernel's own causal bound, blocks above skipped
    allowed = None if square_causal else allowed_keys(t_q, t_k, causal, mask, query.device)
    if allowed is not None and not bool(allowed.any(dim=1).all()):  # a query with no key: the reference's 0, -inf
        return reference_partial_attention(query, key, value, scale, causal=causal, mask=mask)
    group = heads // kv_heads
    q = query.float().transpose(0, 1).unsqueeze(0)  # (1, H, T_q, D)
    # every query head's KV head, copied: T_k * H * D values, small beside the T_q * T_k * H * D of attention
    k, v = (t.float().repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0) for t in (key, value))
    bias = None if allowed is None else torch.zeros(t_q, t_k, device=query.device).masked_fill_(
        ~allowed, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, square_causal,
                                                                          attn_mask=bias, scale=scale)
    return out[0].transpose(0, 1).to(query.dtype), lse[0].transpose(0, 1)

