"""Pure-torch reference of the sync-layer math; the judge of any faster kernel.

Shapes follow vLLM: queries (T_q, H, D), keys/values (T_k, H_kv, D) with H % H_kv == 0 (GQA).
Softmax statistics are kept in fp32; outputs come back in the query dtype.
"""

from __future__ import annotations

import torch


def partial_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, *, causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of `query` over one key set, with its log-sum-exp.

    causal: the queries are the last T_q of the T_k keys (query i sees keys <= T_k - T_q + i).
    mask: (T_q, T_k) bool, True where a query may see a key (with `causal`, both must allow it).
    Returns out (T_q, H, D) and lse (T_q, H) fp32; a query with no keys gets out 0, lse -inf.
    """
    t_q, heads, dim = query.shape
    t_k, kv_heads, _ = key.shape
    group = heads // kv_heads
    # Query heads grouped under their KV head (GQA): keys/values are never expanded or copied.
    q = query.float().view(t_q, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, group * t_q, dim)
    k = key.float().permute(1, 2, 0)  # (H_kv, D, T_k)
    v = value.float().transpose(0, 1)  # (H_kv, T_k, D)
    scores = torch.bmm(q * scale, k).view(kv_heads, group, t_q, t_k)
    if (allowed := allowed_keys(t_q, t_k, causal, mask, query.device)) is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (H_kv, G, T_q)
    weights = torch.exp(scores - lse.unsqueeze(-1))
    if t_k == 0 or (causal and t_k < t_q) or mask is not None:  # rows without keys: -inf - -inf
        weights = weights.nan_to_num(0.0)
    out = torch.bmm(weights.view(kv_heads, group * t_q, t_k), v).view(kv_heads, group, t_q, dim)
    out = out.permute(2, 0, 1, 3).reshape(t_q, heads, dim)
    return out.to(query.dtype), lse.permute(2, 0, 1).reshape(t_q, heads)


def allowed_keys(t_q: int, t_k: int, causal: bool, mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """(T_q, T_k) bool of the keys each query may see (None: all): the causal bound (queries are the last T_q of
    the T_k keys; a single query is the newest token and sees every key) and `mask` together."""
    allowed = None
    if causal and t_q > 1:
        allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    return allowed


def decode_attention(
    queries: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float
) -> torch.Tensor:
    """B decoding tokens at once, each over its own key set: queries (B, H, D), keys[b]/values[b] (T_b, H_kv, D).

    One padded, masked softmax for the batch (every key set of a layer's generators in one call; a single key set
    unpadded, read in place), equal to
    `partial_attention(queries[b:b+1], keys[b], values[b], scale)[0]` for each b. Returns (B, H, D).
    """
    batch, heads, dim = queries.shape
    kv_heads = keys[0].shape[1]
    if batch == 1:  # one key set: attended in place (a copy of a long context every step costs more than the math)
        k, v = keys[0].unsqueeze(0).float(), values[0].unsqueeze(0).float()
    else:
        k = torch.nn.utils.rnn.pad_sequence(keys, batch_first=True).float()  # (B, T_max, H_kv, D)
        v = torch.nn.utils.rnn.pad_sequence(values, batch_first=True).float()
    q = queries.float().view(batch, kv_heads, heads // kv_heads, dim) * scale  # GQA: heads under their KV head
    scores = torch.einsum("bhgd,bthd->bhgt", q, k)
    if batch > 1:
        lengths = torch.tensor([key_set.shape[0] for key_set in keys], device=queries.device)
        padding = torch.arange(k.shape[1], device=queries.device) >= lengths[:, None]  # (B, T_max)
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhgt,bthd->bhgd", weights, v).reshape(batch, heads, dim).to(queries.dtype)


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


def concat_kv(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key/value pairs (T_i, H_kv, D), keys and values each concatenated along the rows."""
    return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])
