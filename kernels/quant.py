"""Int8 K/V for the wire: symmetric absmax quantisation with one scale per token and head."""

from __future__ import annotations

import torch


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H, D) -> (q int8 (T, H, D), scale float32 (T, H, 1)) with x ~ q * scale, |x - q * scale| <= scale / 2."""
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays exactly zero
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(T, H, D) in `dtype` from `quantize_int8`'s output."""
    return (q.float() * scale).to(dtype)
