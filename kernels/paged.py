"""Sync-layer attention on vLLM's own CPU attention kernel, over keys kept in vLLM's paged layout.

`PagedKeys` holds keys and values as vLLM's CPU backend holds its cache (blocks of `block_size` rows, key and
value halves, written by vLLM's reshape-and-cache op in the layout the kernel's instruction set reads), and
`paged_attention` runs vLLM's CPU kernel over them: queries that are the last rows, each seeing every row up to
itself, in one softmax (no log-sum-exp merge). A participant's prefill rows at a sync layer attend over
[public prefix, foreign, own segment] so; a generator's decode over foreign + own prompt + generated keys, its
buffer growing by a row a step instead of being copied. Every key set lives in one shared `PagedPool` (one
tensor, as vLLM's own cache), so a layer's recomputed rows, every participant's and generator's, are one kernel
call. The torch reference (`kernels.reference`) is the judge (tests/test_kernels.py) and serves wherever vLLM
has no CPU kernel (`available`).
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from collections.abc import Sequence

import torch
from vllm import _custom_ops as ops  # loads vLLM's kernels into torch.ops._C
from vllm import envs

KV = tuple[torch.Tensor, torch.Tensor]  # (T, H_kv, D) keys and values


@functools.cache
def available(device_type: str) -> bool:
    """Whether vLLM's CPU attention kernel can serve tensors on devices of `device_type`."""
    return device_type == "cpu" and hasattr(torch.ops._C, "cpu_attention_with_kv_cache")


class PagedPool:
    """Blocks in vLLM's CPU paged layout shared by many key sets, so that one kernel call attends for all of them.

    blocks (n, H_kv, 2 * block_size, D): each block's key half then value half, as vLLM's CPU cache holds them.
    Grows by doubling (a block keeps its index) and keeps its size while in use, so that a layer's temporary keys
    reuse the last layer's blocks; blocks are taken back when their `PagedKeys` is released or collected, and
    `trim` gives the memory back when no block is in use. `pool_for` gives the one pool of a layout.
    """

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, block_size: int,
                 isa: str):
        self.block_size, self.isa = block_size, isa
        self._empty = torch.empty((0, kv_heads, 2 * block_size, head_dim), dtype=dtype, device=device)
        self.blocks = self._empty
        self.zeros = torch.zeros((block_size, kv_heads, head_dim), dtype=dtype, device=device)  # a block's rows
        self.offsets = torch.arange(block_size, device=device)  # a row's slot within its block
        self._free: list[int] = []  # free block indices, taken from the end
        self.in_use = 0
        # Keys are added, attended and released between or inside forwards, never beside one (a session's release
        # reaches a worker through vLLM's collective RPC, between steps); the lock keeps the book consistent
        # should a collected `PagedKeys` give its blocks back from inside `allocate` (a re-entrant lock).
        self._lock = threading.RLock()

    def allocate(self, count: int) -> list[int]:
        """`count` blocks' indices (their contents are whatever was there)."""
        with self._lock:
            if len(self._free) < count:
                held = self.blocks.shape[0]
                size = max(2 * held, held + count - len(self._free), 8)
                grown = self.blocks.new_empty((size, *self.blocks.shape[1:]))
                grown[:held] = self.blocks
                self.blocks = grown
                self._free.extend(range(size - 1, held - 1, -1))
            ids = [self._free.pop() for _ in range(count)]
            self.in_use += count
        return ids

    def release(self, ids: list[int]) -> None:
        with self._lock:
            self.in_use -= len(ids)
            self._free.extend(ids)

    def trim(self) -> None:
        """Give the memory back if no block is in use."""
        with self._lock:
            if self.in_use == 0:
                self.blocks, self._free = self._empty, []

    def halves(self) -> tuple[torch.Tensor, ...]:
        """The key and value caches, (blocks, H_kv, block_size, D) views as vLLM's kernels take them."""
        return self.blocks.chunk(2, dim=2)


_POOLS: dict[tuple, PagedPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(like: torch.Tensor, block_size: int, isa: str) -> PagedPool:
    """The pool of keys shaped like `like` (T, H_kv, D) in its dtype and device, for vLLM's `block_size` and `isa`
    (those of the model's own attention cache: vLLM chose them for this dtype and head size)."""
    key = (like.shape[1], like.shape[2], like.dtype, like.device, block_size, isa)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = PagedPool(*key)
        return _POOLS[key]


def blocks_in_use() -> int:
    """Blocks held by some `PagedKeys`, over every pool."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    return sum(pool.in_use for pool in pools)


def trim_pools() -> None:
    """Every pool's memory back where none of its blocks is in use (the worker holds no session)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    for pool in pools:
        pool.trim()


class PagedKeys:
    """Append-only keys and values (T, H_kv, D) in blocks of a `PagedPool`; blocks are taken as rows arrive and
    go back on `release()` or when this is collected. The rows of its last block past the end are zeros (the
    kernel reads whole blocks: a reused block's old contents, or garbage, could be NaN)."""

    def __init__(self, pool: PagedPool):
        self.pool, self.size = pool, 0
        self._ids: list[int] = []
        self._slots = torch.empty(0, dtype=torch.long, device=pool.blocks.device)  # row i's slot in the pool
        self.block_table = torch.empty(0, dtype=torch.int32, device=pool.blocks.device)  # row i: block [i // size]
        self._finalizer = weakref.finalize(self, pool.release, self._ids)

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def append(self, *parts: KV) -> None:
        """Add rows (T, H_kv, D), part after part, after those held (rows may be strided: a view of the batch's
        keys is read in place, as vLLM's own cache update reads it)."""
        row = self._reserve(sum(k.shape[0] for k, _ in parts))
        keys, values = self.pool.halves()
        for k, v in parts:
            if k.shape[0]:
                ops.cpu_attn_reshape_and_cache(_rows(k), _rows(v), keys, values, self._slots[row: row + k.shape[0]],
                                               self.pool.isa)
                row += k.shape[0]

    def _reserve(self, count: int) -> int:
        """Room for `count` more rows (blocks taken as needed, a new last block's rows past the end zeroed): the
        first of them, whose slots the caller then writes."""
        if self.released:
            raise ValueError("keys added after their blocks were released")
        start, end = self.size, self.size + count
        pool, block = self.pool, self.pool.block_size
        if (more := -(-end // block) - len(self._ids)) > 0:
            ids = pool.allocate(more)
            self._ids.extend(ids)
            fresh = torch.tensor(ids, device=self._slots.device)
            self._slots = torch.cat([self._slots, (fresh[:, None] * block + pool.offsets).flatten()])
            self.block_table = torch.tensor(self._ids, dtype=torch.int32, device=self._slots.device)
            if end % block:
                tail = self._slots[end:]
                zeros = pool.zeros[: tail.shape[0]]
                ops.cpu_attn_reshape_and_cache(zeros, zeros, *pool.halves(), tail, pool.isa)
        self.size = end
        return start

    def _slot(self, row: int) -> int:
        """Row `row`'s slot in the pool (what `_slots` holds for it), computed without a tensor op."""
        return self._ids[row // self.pool.block_size] * self.pool.block_size + row % self.pool.block_size

    def release(self) -> None:
        """Give the blocks back now (idempotent; nothing may be read from or added to these keys after)."""
        self._finalizer()
        self.size = 0


def append_each(held: Sequence[PagedKeys], keys: torch.Tensor, values: torch.Tensor) -> None:
    """Row i of keys/values (G, H_kv, D) after held[i]'s rows (every held in one pool): a decode step's new tokens,
    one per generator, in one cache write instead of one each."""
    pool = held[0].pool
    if any(h.pool is not pool for h in held) or keys.shape[0] != len(held):
        raise ValueError("one row per key set, every key set in one pool")
    slots = torch.tensor([h._slot(h._reserve(1)) for h in held], device=pool.blocks.device)
    ops.cpu_attn_reshape_and_cache(_rows(keys), _rows(values), *pool.halves(), slots, pool.isa)


def paged_attention(query: torch.Tensor, lengths: Sequence[int], held: Sequence[PagedKeys], scale: float,
                    seen: Sequence[int | None] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """query (sum T_i, H, D), request after request (rows may be strided): request i's T_i = lengths[i] rows are the
    last T_i of held[i]'s first seen[i] rows (None: all of them), each attending over every row up to itself
    (causal), in one softmax; every request in one call of vLLM's CPU kernel (all keys in one pool). Returns (sum
    T_i, H, D) in the query's dtype, written into `out` where given (a view of the layer's output: no copy; see
    `fits_output`): `kernels.reference.partial_attention(q_i, *rows_i, scale, causal=True)[0]` stacked (a
    generator's decode token is a request of one row; a public prefix's rows, the first rows of their
    participant's keys)."""
    pool = held[0].pool
    lengths = tuple(lengths)
    seen = tuple(h.size if n is None else n for h, n in zip(held, seen or [None] * len(held), strict=True))
    if any(h.pool is not pool for h in held):
        raise ValueError("paged attention over keys in different pools")
    if any(h.released or not t <= n <= h.size for h, t, n in zip(held, lengths, seen, strict=True)):
        raise ValueError("paged attention over released keys, or fewer keys than queries")
    if sum(lengths) != query.shape[0] or (out is not None and not fits_output(out, query)):
        raise ValueError("paged attention's query or output rows do not match its requests")
    query = _rows(query)
    output = torch.empty_like(query) if out is None else out
    starts, seq_lens, schedule = _schedule(lengths, seen, query.shape[1],
                                           pool.blocks.shape[1], query.shape[2], query.dtype, pool.isa,
                                           torch.get_num_threads())
    block_table = held[0].block_table[None] if len(held) == 1 else \
        torch.nn.utils.rnn.pad_sequence([h.block_table for h in held], batch_first=True)
    key_cache, value_cache = pool.halves()
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output, query_start_loc=starts,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table,
        softcap=0.0, scheduler_metadata=schedule, s_aux=None)
    return output


def fits_output(out: torch.Tensor, query: torch.Tensor) -> bool:
    """Whether the kernel can write `query`'s result into `out`: its shape and dtype, packed (the kernel takes the
    output's address alone, no strides)."""
    return out.shape == query.shape and out.dtype == query.dtype and out.is_contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` (T, heads, D) as vLLM's CPU kernels read it: each row's heads packed, rows at any stride (a view of the
    batch's fused projection is; a copy only otherwise)."""
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


@functools.lru_cache(maxsize=64)
def _schedule(query_lengths: tuple[int, ...], seen: tuple[int, ...], heads: int, kv_heads: int, head_dim: int,
              dtype: torch.dtype, isa: str, threads: int) -> tuple[torch.Tensor, ...]:
    """(query start offsets, key lengths, vLLM's work schedule) of a call: the same at every layer of a step, so
    computed once for all of them, as vLLM's own backend does (the kernel only reads them, and checks the schedule
    was made for its `threads` OpenMP threads)."""
    starts = torch.tensor([0, *itertools.accumulate(query_lengths)], dtype=torch.int32)
    seq_lens = torch.tensor(seen, dtype=torch.int32)
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seen), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, seq_lens=seq_lens, dtype=dtype,
        query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)  # as vLLM's own CPU attention schedules it
    return starts, seq_lens, schedule
