"""The sync-layer math against naive masked softmax attention."""

import pytest
import torch
from torch.testing import assert_close

from kernels import decode_attention, fused_partial_attention, gather_tokens, merge_attention, partial_attention
from kernels.paged import available


def naive(query, key, value, scale, allowed):
    """Plain masked softmax attention, one head at a time."""
    group = query.shape[1] // key.shape[1]
    out = torch.empty_like(query, dtype=torch.float64)
    for h in range(query.shape[1]):
        scores = query[:, h].double() @ key[:, h // group].double().T * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, -1) @ value[:, h // group].double()
    return out


VLLM_CPU_KERNEL = pytest.mark.skipif(not available("cpu"), reason="this vLLM build has no CPU attention kernel")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads", [(2, 1), (4, 4), (14, 2), (9, 3)])
@pytest.mark.parametrize("t_q, t_own, t_foreign", [(1, 1, 1), (1, 9, 30), (7, 7, 5), (5, 12, 0), (16, 16, 40)])
def test_split_and_merge_equals_attention_over_the_union(dtype, heads, kv_heads, t_q, t_own, t_foreign):
    d, scale = 64, 64**-0.5
    q = torch.randn(t_q, heads, d).to(dtype)
    own_k, own_v = torch.randn(t_own, kv_heads, d).to(dtype), torch.randn(t_own, kv_heads, d).to(dtype)
    far_k, far_v = torch.randn(t_foreign, kv_heads, d).to(dtype), torch.randn(t_foreign, kv_heads, d).to(dtype)
    out_own, lse_own = partial_attention(q, own_k, own_v, scale, causal=True)
    out_far, lse_far = partial_attention(q, far_k, far_v, scale)
    out, lse = merge_attention(out_far, lse_far, out_own, lse_own)
    # the foreign keys precede the own ones; the own part is causal
    causal = torch.ones(t_q, t_own, dtype=torch.bool).tril(t_own - t_q)
    allowed = torch.cat([torch.ones(t_q, t_foreign, dtype=torch.bool), causal], dim=1)
    expected = naive(q, torch.cat([far_k, own_k]), torch.cat([far_v, own_v]), scale, allowed)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mask_restricts_the_keys_on_top_of_causality(dtype):
    """Sparse local computation: each query sees a subset of its causal keys (always itself)."""
    d, scale, t = 64, 64**-0.5, 11
    q, k, v = (torch.randn(t, 4, d).to(dtype) for _ in range(3))
    mask = torch.rand(t, t) < 0.4
    mask |= torch.eye(t, dtype=torch.bool)
    out, lse = partial_attention(q, k[:, :2], v[:, :2], scale, causal=True, mask=mask)
    expected = naive(q, k[:, :2], v[:, :2], scale, mask & torch.ones(t, t, dtype=torch.bool).tril())
    assert_close(out.double(), expected, **TOL[dtype])
    dense, _ = partial_attention(q, k[:, :2], v[:, :2], scale, causal=True)
    assert not torch.allclose(out.float(), dense.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(2, 1), (14, 2), (4, 4)])
@pytest.mark.parametrize("lengths", [[1, 37, 5, 120, 37], [120]])  # a batch, and one key set (read in place)
def test_decoding_tokens_in_one_padded_call_equal_each_over_its_own_keys(dtype, heads, kv_heads, lengths):
    d, scale = 64, 64**-0.5
    queries = torch.randn(len(lengths), heads, d).to(dtype)
    keys = [torch.randn(t, kv_heads, d).to(dtype) for t in lengths]
    values = [torch.randn(t, kv_heads, d).to(dtype) for t in lengths]
    batched = decode_attention(queries, keys, values, scale)
    assert batched.shape == queries.shape and batched.dtype == dtype
    for b in range(len(lengths)):
        alone = partial_attention(queries[b:b + 1], keys[b], values[b], scale)[0][0]
        assert_close(batched[b].float(), alone.float(), **TOL[dtype])


@VLLM_CPU_KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(14, 2), (4, 4)])
def test_decoding_on_vllms_cpu_kernel_over_paged_keys_equals_the_reference(dtype, heads, kv_heads):
    """Keys appended as a decode grows them (a prompt, then a row a step, past the first blocks), every generator
    in one call."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kernels.paged import PagedKeys, PagedPool, paged_attention

    d, scale, block = 64, 64**-0.5, 32
    pool = PagedPool(kv_heads, d, dtype, torch.device("cpu"), block, _get_attn_isa(dtype, block, d))
    prompts = [40, 1, 100]
    held = [PagedKeys(pool) for _ in prompts]
    keys = [torch.randn(t, kv_heads, d).to(dtype) for t in prompts]
    values = [torch.randn(t, kv_heads, d).to(dtype) for t in prompts]
    for buffer, k, v in zip(held, keys, values):
        buffer.append((k, v))
    for _ in range(40):  # steps: each generator's new row, then its token attends over everything so far
        for b, buffer in enumerate(held):
            row = torch.randn(1, kv_heads, d).to(dtype), torch.randn(1, kv_heads, d).to(dtype)
            buffer.append(row)
            keys[b], values[b] = torch.cat([keys[b], row[0]]), torch.cat([values[b], row[1]])
        queries = torch.randn(len(prompts), heads, d).to(dtype)
        paged = paged_attention(queries, [1] * len(prompts), held, scale)
        assert paged.dtype == dtype
        assert_close(paged.float(), decode_attention(queries, keys, values, scale).float(), **TOL[dtype])


def _prefill_case(prefix: int, foreign: int, segment: int, dtype: torch.dtype, heads: int = 14, kv_heads: int = 2):
    """(queries, own (prefix + segment) K/V, foreign K/V) of a segment's prefill at a sync layer."""
    q = torch.randn(segment, heads, 64).to(dtype)
    own = torch.randn(prefix + segment, kv_heads, 64).to(dtype), torch.randn(prefix + segment, kv_heads, 64).to(dtype)
    far = torch.randn(foreign, kv_heads, 64).to(dtype), torch.randn(foreign, kv_heads, 64).to(dtype)
    return q, own, far


def _merged_reference(q, own, far, scale):
    """Attention over own (causal) merged with attention over foreign: how the torch path computes a segment."""
    expected = fused_partial_attention(q, *own, scale, causal=True)
    if far[0].shape[0]:
        expected = merge_attention(*fused_partial_attention(q, *far, scale), *expected)
    return expected[0]


@VLLM_CPU_KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layers_prefill_and_decode_rows_in_one_call_equal_the_merged_partials(dtype):
    """Segments' queries over [public prefix, foreign, own segment] causally in one softmax, as the engine's
    reference computes them (own causal, merged with foreign), their public prefixes' queries over the prefix alone
    (the first rows of the same keys), beside a generator's decode token: one call."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kernels.paged import PagedKeys, PagedPool, paged_attention

    scale, block = 64**-0.5, 32
    pool = PagedPool(2, 64, dtype, torch.device("cpu"), block, _get_attn_isa(dtype, block, 64))
    cases = [_prefill_case(*shape, dtype) for shape in [(0, 30, 7), (5, 200, 60), (3, 0, 1), (0, 1, 130)]]
    held, queries, seen, expected = [], [], [], []
    for q, own, far in cases:
        prefix = own[0].shape[0] - q.shape[0]
        keys = PagedKeys(pool)
        keys.append((own[0][:prefix], own[1][:prefix]), far, (own[0][prefix:], own[1][prefix:]))
        assert keys.size == own[0].shape[0] + far[0].shape[0]
        held.append(keys)
        queries.append(q)
        seen.append(None)
        expected.append(_merged_reference(q, own, far, scale))
        if prefix:
            prefix_q, prefix_kv = torch.randn(prefix, 14, 64).to(dtype), (own[0][:prefix], own[1][:prefix])
            held.append(keys)
            queries.append(prefix_q)
            seen.append(prefix)
            expected.append(fused_partial_attention(prefix_q, *prefix_kv, scale, causal=True)[0])
    decode_keys = torch.randn(77, 2, 64).to(dtype), torch.randn(77, 2, 64).to(dtype)
    held.append(PagedKeys(pool))
    held[-1].append(decode_keys)
    queries.append(torch.randn(1, 14, 64).to(dtype))
    seen.append(None)
    expected.append(decode_attention(queries[-1], [decode_keys[0]], [decode_keys[1]], scale))
    lengths = [q.shape[0] for q in queries]
    assert_close(paged_attention(torch.cat(queries), lengths, held, scale, seen).float(), torch.cat(expected).float(),
                 **TOL[dtype])


@VLLM_CPU_KERNEL
def test_paged_attention_reads_a_fused_projections_views_in_place_and_writes_into_the_layers_output():
    """Keys, values and queries as views of one fused projection (rows at its stride, as vLLM hands them to the
    hook), the result written into a slice of the layer's output: equal to the reference, the rows outside the
    slice untouched."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kernels.paged import PagedKeys, PagedPool, paged_attention

    heads, kv_heads, d, block, scale = 14, 2, 64, 32, 64**-0.5
    pool = PagedPool(kv_heads, d, torch.float32, torch.device("cpu"), block, _get_attn_isa(torch.float32, block, d))
    tokens, prefix = 90, 10  # the batch: 10 rows of another request, then a participant's prefix and segment
    qkv = torch.randn(10 + tokens, (heads + 2 * kv_heads) * d)
    q, k, v = (t.view(-1, h, d) for t, h in zip(qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1),
                                                   (heads, kv_heads, kv_heads)))
    assert not k.is_contiguous()
    far = torch.randn(50, kv_heads, d), torch.randn(50, kv_heads, d)
    own = k[10:], v[10:]
    held = PagedKeys(pool)
    held.append((own[0][:prefix], own[1][:prefix]), far, (own[0][prefix:], own[1][prefix:]))
    output = torch.full((10 + tokens, heads, d), 7.0)
    # the participant's prefix rows over the prefix alone, then its segment over everything: rows 10.. unbroken
    paged_attention(q[10:], [prefix, tokens - prefix], [held, held], scale, [prefix, None], out=output[10:])
    expected_prefix = partial_attention(q[10:20], own[0][:prefix], own[1][:prefix], scale, causal=True)[0]
    expected_segment = _merged_reference(q[20:], (own[0], own[1]), far, scale)
    assert_close(output[10:20], expected_prefix)
    assert_close(output[20:], expected_segment)
    assert torch.equal(output[:10], torch.full((10, heads, d), 7.0))
    with pytest.raises(ValueError, match="rows"):
        paged_attention(q[10:], [tokens], [held], scale, out=output[11:])
    with pytest.raises(ValueError, match="rows"):  # the kernel takes the output's address, not its strides
        paged_attention(q[10:], [tokens], [held], scale, out=torch.empty(tokens, heads, 2 * d)[..., :d])


@VLLM_CPU_KERNEL
@pytest.mark.parametrize("gap", [0, 5])
def test_a_layers_recomputed_rows_land_on_their_batch_rows_whether_or_not_they_run_unbroken(gap):
    """The sync-layer hook's paged call: requests (a participant's public-prefix rows, its segment's, a generator's
    token) given out of row order; where they cover one row range the kernel writes the layer's output in place,
    where another request's rows lie between them (gap) through a gathered copy; rows of no request untouched."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from fedattn_vllm.vllm_ext.attention import _attend_paged
    from kernels.paged import PagedKeys, PagedPool

    heads, kv_heads, d, block, scale = 14, 2, 64, 32, 64**-0.5
    pool = PagedPool(kv_heads, d, torch.float32, torch.device("cpu"), block, _get_attn_isa(torch.float32, block, d))
    prefix, segment, foreign, decoded = 6, 40, 70, 55
    rows = 1 + gap + prefix + segment
    query, key, value = torch.randn(rows, heads, d), torch.randn(rows, kv_heads, d), torch.randn(rows, kv_heads, d)
    far = torch.randn(foreign, kv_heads, d), torch.randn(foreign, kv_heads, d)
    generator_keys = torch.randn(decoded, kv_heads, d), torch.randn(decoded, kv_heads, d)
    generator, participant = PagedKeys(pool), PagedKeys(pool)
    generator.append(generator_keys)
    start = 1 + gap  # row 0: the generator's token; then `gap` rows of a request no one recomputes
    own = key[start:], value[start:]
    participant.append((own[0][:prefix], own[1][:prefix]), far, (own[0][prefix:], own[1][prefix:]))
    requests = [(slice(start + prefix, rows), participant, None), (slice(0, 1), generator, None),
                (slice(start, start + prefix), participant, prefix)]
    output = torch.full((rows, heads, d), 3.0)
    _attend_paged(sorted(requests, key=lambda r: r[0].start), query, output, scale)
    assert_close(output[0:1], decode_attention(query[0:1], [generator_keys[0]], [generator_keys[1]], scale))
    assert torch.equal(output[1:start], torch.full((gap, heads, d), 3.0))
    assert_close(output[start:start + prefix],
                 partial_attention(query[start:start + prefix], own[0][:prefix], own[1][:prefix], scale, causal=True)[0])
    assert_close(output[start + prefix:], _merged_reference(query[start + prefix:], own, far, scale))


@VLLM_CPU_KERNEL
def test_a_pool_reuses_released_blocks_and_gives_its_memory_back_when_trimmed_with_none_held():
    """Released blocks serve again without growing the pool; whatever they held before (NaN here) is never read:
    every row a kernel reads is written, and a last block's rows past the end are zeroed."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kernels.paged import PagedKeys, PagedPool, paged_attention

    pool = PagedPool(2, 64, torch.float32, torch.device("cpu"), 16, _get_attn_isa(torch.float32, 16, 64))
    rows = lambda t: (torch.randn(t, 2, 64), torch.randn(t, 2, 64))  # noqa: E731
    kept, dropped = PagedKeys(pool), PagedKeys(pool)
    kept.append(rows(40))  # 3 blocks
    dropped.append(rows(100))  # 7 blocks
    size, dropped_blocks = pool.blocks.shape[0], dropped.block_table.long()
    dropped.release()
    pool.blocks[dropped_blocks] = float("nan")  # poisoned, as a reused block's old contents could be
    again, kv = PagedKeys(pool), rows(90)
    again.append((kv[0][:50], kv[1][:50]))
    again.append((kv[0][50:], kv[1][50:]))
    assert pool.blocks.shape[0] == size and set(again.block_table.tolist()) <= set(dropped_blocks.tolist())
    q, scale = torch.randn(3, 4, 64), 64**-0.5
    expected = partial_attention(q, *kv, scale, causal=True)[0]
    assert_close(paged_attention(q, [3], [again], scale), expected)
    del again  # collected: its blocks go back too
    pool.trim()  # one is still held: the memory stays
    assert pool.blocks.shape[0] == size
    kept.release()
    pool.trim()
    assert pool.blocks.shape[0] == 0


@VLLM_CPU_KERNEL
def test_a_decode_steps_tokens_appended_in_one_write_equal_appending_each_and_attend_over_everything():
    """A layer's decoding generators get their new token in one cache write (`append_each`: rows of the batch's
    strided keys) across block boundaries into reused, poisoned blocks: the pool holds what one append per
    generator writes, and each generator's token attends over its keys so far."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kernels.paged import PagedKeys, PagedPool, append_each, paged_attention

    heads, kv_heads, d, block, scale = 14, 2, 64, 16, 64**-0.5
    isa = _get_attn_isa(torch.float32, block, d)
    batched, single = (PagedPool(kv_heads, d, torch.float32, torch.device("cpu"), block, isa) for _ in range(2))
    poison = PagedKeys(batched)
    poison.append((torch.randn(200, kv_heads, d), torch.randn(200, kv_heads, d)))
    batched.blocks[:] = float("nan")
    poison.release()  # the generators' blocks are these, whatever they held
    prompts = [(torch.randn(t, kv_heads, d), torch.randn(t, kv_heads, d)) for t in (15, 16, 1, 40)]
    held = [PagedKeys(batched) for _ in prompts]
    alone = [PagedKeys(single) for _ in prompts]
    for keys, kv in [*zip(held, prompts), *zip(alone, prompts)]:
        keys.append(kv)
    every = [list(kv) for kv in prompts]  # (keys, values) so far
    for _ in range(20):  # the batch: a row of another request, then the generators' tokens at a fused stride
        qkv = torch.randn(1 + len(held), (heads + 2 * kv_heads) * d)
        q, k, v = (t.view(-1, h, d) for t, h in zip(qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1),
                                                       (heads, kv_heads, kv_heads)))
        append_each(held, k[1:], v[1:])
        for i, keys in enumerate(alone):
            keys.append((k[1 + i: 2 + i], v[1 + i: 2 + i]))
            every[i] = [torch.cat([every[i][0], k[1 + i: 2 + i]]), torch.cat([every[i][1], v[1 + i: 2 + i]])]
        out = paged_attention(q[1:], [1] * len(held), held, scale)
        for i in range(len(held)):
            assert_close(out[i:i + 1], decode_attention(q[1 + i: 2 + i], [every[i][0]], [every[i][1]], scale))
    for batch_keys, one_keys in zip(held, alone):
        assert batch_keys.size == one_keys.size
        assert torch.equal(batched.blocks[batch_keys.block_table.long()], single.blocks[one_keys.block_table.long()])
    with pytest.raises(ValueError, match="one row per key set"):
        append_each(held, k[1:3], v[1:3])


def test_lse_is_the_log_partition_function():
    q, k, v = torch.randn(3, 2, 8), torch.randn(5, 1, 8), torch.randn(5, 1, 8)
    _, lse = partial_attention(q, k, v, 0.5)
    scores = torch.einsum("qhd,kd->qhk", q, k[:, 0]) * 0.5
    assert_close(lse, torch.logsumexp(scores, -1))


def test_empty_key_sets_are_neutral_in_a_merge():
    q, k, v = torch.randn(4, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    out, lse = partial_attention(q, k, v, 0.3)
    empty_out, empty_lse = partial_attention(q, k[:0], v[:0], 0.3)
    assert torch.isneginf(empty_lse).all() and (empty_out == 0).all()
    merged, merged_lse = merge_attention(empty_out, empty_lse, out, lse)
    assert_close(merged, out)
    assert_close(merged_lse, lse)
    both, both_lse = merge_attention(empty_out, empty_lse, empty_out, empty_lse)
    assert (both == 0).all() and torch.isneginf(both_lse).all()


def test_merge_is_associative_over_three_sets():
    q = torch.randn(2, 4, 16)
    parts = [(torch.randn(n, 2, 16), torch.randn(n, 2, 16)) for n in (3, 5, 7)]
    partials = [partial_attention(q, k, v, 0.25) for k, v in parts]
    left = merge_attention(*merge_attention(*partials[0], *partials[1]), *partials[2])
    right = merge_attention(*partials[0], *merge_attention(*partials[1], *partials[2]))
    whole = partial_attention(q, torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts]), 0.25)
    assert_close(left[0], whole[0])
    assert_close(right[0], whole[0])


def test_gather_tokens():
    kv = torch.arange(12.0).view(6, 1, 2)
    assert gather_tokens(kv, None) is kv
    assert gather_tokens(kv, torch.tensor([1, 4])).flatten().tolist() == [2.0, 3.0, 8.0, 9.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(2, 1), (14, 2), (4, 4)])
@pytest.mark.parametrize("t_q, t_k, causal, masked", [
    (1, 9, False, False), (7, 30, False, False), (12, 12, True, False), (5, 12, True, False),  # a prefix before
    (12, 15, True, True), (6, 6, False, True), (3, 0, False, False), (4, 2, True, False)])  # no keys / rows
def test_the_fused_kernel_equals_the_reference(dtype, heads, kv_heads, t_q, t_k, causal, masked):
    d, scale = 64, 64**-0.5
    g = torch.Generator().manual_seed(t_q * 100 + t_k)
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for t, h in ((t_q, heads), (t_k, kv_heads), (t_k, kv_heads)))
    mask = (torch.rand(t_q, t_k, generator=g) < 0.6) if masked else None
    if masked and t_q > 2:
        mask[1] = False  # a query with no key at all
    expected = partial_attention(q, k, v, scale, causal=causal, mask=mask)
    out, lse = fused_partial_attention(q, k, v, scale, causal=causal, mask=mask)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # the same fp32 math summed in another order; a bf16 output may round one unit apart
    unit = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    assert_close(out.float(), expected[0].float(), **unit)
    assert_close(lse, expected[1], **TOL[torch.float32])
