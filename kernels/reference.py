"""Pure-torch reference of the sync-layer math; the judge of any faster kernel.

Shapes follow vLLM: queries (T_q, H, D), keys/values (T_k, H_kv, D) with H % H_kv == 0 (GQA).
Softmax statistics are kept in fp32; outputs come back in the query dtype.
"""

from __future__ import annotations

import torch


def partial_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, *, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of `query` over one key set, with its log-sum-exp.

    causal: the queries are the last T_q of the T_k keys (query i sees keys <= T_k - T_q + i).
    Returns out (T_q, H, D) and lse (T_q, H) fp32; a query with no keys gets out 0, lse -inf.
    """
    t_q, heads, _ = query.shape
    t_k, kv_heads, _ = key.shape
    group = heads // kv_heads
    q = query.float().transpose(0, 1)  # (H, T_q, D)
    k = key.float().transpose(0, 1).repeat_interleave(group, dim=0)  # (H, T_k, D)
    v = value.float().transpose(0, 1).repeat_interleave(group, dim=0)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # (H, T_q, T_k)
    if causal:
        allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=query.device).tril(t_k - t_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (H, T_q)
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # empty rows: -inf - -inf
    out = torch.matmul(weights, v)  # (H, T_q, D)
    return out.transpose(0, 1).to(query.dtype), lse.transpose(0, 1).contiguous()


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention over the union of two disjoint key sets, from their partials."""
    lse = torch.logaddexp(lse_a, lse_b)  # (T_q, H)
    w_a = torch.exp(lse_a - lse).nan_to_num(0.0).unsqueeze(-1)  # both empty: -inf - -inf
    w_b = torch.exp(lse_b - lse).nan_to_num(0.0).unsqueeze(-1)
    out = out_a.float() * w_a + out_b.float() * w_b
    return out.to(out_a.dtype), lse


def gather_tokens(tensor: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Rows `positions` of a (T, ...) tensor (sparse K/V sharing); None keeps every row."""
    return tensor if positions is None else tensor.index_select(0, positions.to(tensor.device))
