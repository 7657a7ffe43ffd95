"""Int8 K/V for the wire: symmetric absmax quantisation along a chosen axis.

Keys carry a few large outlier channels, so they take one scale per head and channel
(over the message's tokens); values take one scale per token and head (KIVI's split).
"""

from __future__ import annotations

import torch


def quantize_int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H, D) -> (q int8 (T, H, D), float32 scales reduced over `dim`, kept as size 1).

    x ~ q * scale with |x - q * scale| <= scale / 2; keys: dim=0 (scale (1, H, D)), values: dim=-1 ((T, H, 1)).
    """
    scale = x.abs().amax(dim=dim, keepdim=True).float() / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero slice stays exactly zero
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(T, H, D) in `dtype` from `quantize_int8`'s output."""
    return (q.float() * scale).to(dtype)
