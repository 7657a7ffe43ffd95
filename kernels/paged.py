"""Sync-layer attention on vLLM's own CPU attention kernel, over keys kept in vLLM's paged layout.

`PagedKeys` holds keys and values as vLLM's CPU backend holds its cache (blocks of `block_size` rows, key and
value halves, written by vLLM's reshape-and-cache op in the layout the kernel's instruction set reads), and
`paged_attention` runs vLLM's CPU kernel over them: queries that are the last rows, each seeing every row up to
itself, in one softmax (no log-sum-exp merge). A participant's prefill rows at a sync layer attend over
[public prefix, foreign, own segment] so; a generator's decode over foreign + own prompt + generated keys, its
buffer growing by a row a step instead of being copied (`paged_decode_attention`). The torch reference
(`kernels.reference`) is the judge (tests/test_kernels.py) and serves wherever vLLM has no CPU kernel
(`available`).
"""

from __future__ import annotations

import functools

import torch
from vllm import _custom_ops as ops  # loads vLLM's kernels into torch.ops._C

KV = tuple[torch.Tensor, torch.Tensor]  # (T, H_kv, D) keys and values


@functools.cache
def available(device_type: str) -> bool:
    """Whether vLLM's CPU attention kernel can serve tensors on devices of `device_type`."""
    return device_type == "cpu" and hasattr(torch.ops._C, "cpu_attention_with_kv_cache")


class PagedKeys:
    """Append-only keys and values (T, H_kv, D) in vLLM's CPU paged layout; room grows by whole blocks (doubling).
    A block is zeroed when its first row is written (the kernel reads whole blocks: garbage in a block's unwritten
    tail could be NaN), so room reserved and never reached costs no memory.

    block_size and isa: those of the model's own attention cache (vLLM chose them for this dtype and head size).
    """

    def __init__(self, like: KV, rows: int, block_size: int, isa: str):
        """Empty, with room for `rows` rows of `like`'s dtype, device and head shape."""
        self.block_size, self.isa, self.size = block_size, isa, 0
        self.kv_heads = like[0].shape[1]
        self._blocks = like[0].new_empty((self._block_count(rows), self.kv_heads, 2 * block_size, like[0].shape[2]))
        self.block_table = self._block_table()  # (1, blocks): block i holds rows i * block_size ...

    def _block_count(self, rows: int) -> int:
        return max(-(-rows // self.block_size), 1)

    def _block_table(self) -> torch.Tensor:
        return torch.arange(self._blocks.shape[0], dtype=torch.int32, device=self._blocks.device)[None]

    def halves(self) -> KV:
        """The key and value caches, (blocks, H_kv, block_size, D) views as vLLM's kernels take them."""
        keys, values = self._blocks.chunk(2, dim=2)
        return keys, values

    def append(self, kv: KV) -> None:
        """Add rows (T, H_kv, D) after those held."""
        end = self.size + kv[0].shape[0]
        if end == self.size:
            return
        started = -(-self.size // self.block_size)  # blocks holding rows already
        if end > self._blocks.shape[0] * self.block_size:
            grown = self._blocks.new_empty((max(2 * self._blocks.shape[0], self._block_count(end)),
                                            *self._blocks.shape[1:]))
            grown[:started] = self._blocks[:started]  # rows keep their block and offset
            self._blocks = grown
            self.block_table = self._block_table()
        self._blocks[started: self._block_count(end)].zero_()  # the blocks this append starts
        slots = torch.arange(self.size, end, dtype=torch.long, device=self._blocks.device)
        ops.cpu_attn_reshape_and_cache(kv[0].contiguous(), kv[1].contiguous(), *self.halves(), slots, self.isa)
        self.size = end


def paged_attention(query: torch.Tensor, held: PagedKeys, scale: float) -> torch.Tensor:
    """query (T_q, H, D): the last T_q of `held`'s rows, each attending over every row up to itself (causal), in one
    softmax: `kernels.reference.partial_attention(query, *rows, scale, causal=True)[0]` on vLLM's CPU kernel."""
    output = torch.empty_like(query)
    queries = torch.tensor([0, query.shape[0]], dtype=torch.int32)
    seq_lens = torch.tensor([held.size], dtype=torch.int32)
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=query.shape[1], num_kv_heads=held.kv_heads, head_dim=query.shape[2], seq_lens=seq_lens,
        dtype=query.dtype, query_start_loc=queries, causal=True, sliding_window_size=-1, isa=held.isa,
        enable_kv_split=False)
    key_cache, value_cache = held.halves()
    ops.cpu_attention_with_kv_cache(
        query=query.contiguous(), key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=queries, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=held.block_table, softcap=0.0, scheduler_metadata=schedule, s_aux=None)
    return output


def paged_decode_attention(queries: torch.Tensor, keys: list[PagedKeys], scale: float) -> torch.Tensor:
    """queries (B, H, D), one new token of each of B generators, each over its own `keys[b]` (all of them visible):
    `kernels.reference.decode_attention` on vLLM's CPU kernel. Returns (B, H, D) in the queries' dtype."""
    return torch.cat([paged_attention(queries[b: b + 1], held, scale) for b, held in enumerate(keys)])
