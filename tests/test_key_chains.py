"""A session's prefilling participants on vLLM's CPU kernel share one key set, [public prefix, segment 0, ...],
where each one's keys are its first rows (`attention._key_chains`): which participants, and what they attend to."""

import pytest
import torch
from torch.testing import assert_close

from fedattn_vllm.config import FedAttnConfig, KVWire
from fedattn_vllm.vllm_ext.attention import _key_chains
from fedattn_vllm.vllm_ext.batch import FedAttnBatch, ParticipantRows
from fedattn_vllm.vllm_ext.sessions import SessionState
from kernels import partial_attention
from kernels.paged import available, blocks_in_use, paged_attention

pytestmark = pytest.mark.skipif(not available("cpu"), reason="this vLLM build has no CPU attention kernel")

HEADS, KV_HEADS, D, BLOCK, LAYERS = 4, 2, 64, 16, 4
LENGTHS, PREFIX = [7, 20, 13, 9], 3


def _paging() -> tuple[int, str]:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return BLOCK, _get_attn_isa(torch.float32, BLOCK, D)


def _batch(config: FedAttnConfig, present=range(len(LENGTHS))) -> tuple[FedAttnBatch, SessionState]:
    """Every participant in `present` prefilling its request ([prefix, segment]) in participant order."""
    state = SessionState("chains", config.resolve(LAYERS, len(LENGTHS)), list(LENGTHS), PREFIX)
    entries, start = [], 0
    for n in present:
        entries.append(ParticipantRows(state, n, slice(start, start + PREFIX + LENGTHS[n]), True, 4))
        start += PREFIX + LENGTHS[n]
    return FedAttnBatch(entries), state


def _kv(batch: FedAttnBatch) -> tuple[torch.Tensor, ...]:
    rows = batch.entries[-1].rows.stop
    torch.manual_seed(0)
    return torch.randn(rows, HEADS, D), torch.randn(rows, KV_HEADS, D), torch.randn(rows, KV_HEADS, D)


def test_every_participant_attends_over_the_first_rows_of_one_chain_as_over_its_own_keys():
    """At H = 1 participant n sees [prefix, segments 0..n]: one chain of them all (the prefix the first
    participant's), each participant's queries over its first rows as over its own prefix and the segments."""
    batch, state = _batch(FedAttnConfig(sync_interval=1, generators=(1,)))  # generator 1 keeps its keys
    query, key, value = _kv(batch)
    before = blocks_in_use()
    chains, keepers = _key_chains(batch, 0, key, value, _paging())
    # generator 1 decodes from its prefill keys, which a later participant's rows would follow: not a user
    assert sorted(chains) == [0, 2, 3] and len(keepers) == 1
    chain = keepers[0][0]
    assert all(held is chain for held, _ in chains.values()) and keepers[0][1:] == (state, 3)
    assert chain.size == PREFIX + sum(LENGTHS)
    for i, (_, seen) in chains.items():
        e = batch.entries[i]
        n = e.participant
        assert seen == PREFIX + sum(LENGTHS[: n + 1])
        segments = [batch.entries[m].segment_rows for m in range(n + 1)]
        keys = [slice(0, PREFIX), *segments]  # participant 0's prefix rows, then the segments
        own_k, own_v = torch.cat([key[r] for r in keys]), torch.cat([value[r] for r in keys])
        q = query[e.segment_rows]
        assert_close(paged_attention(q, [LENGTHS[n]], [chain], 64**-0.5, [seen]),
                     partial_attention(q, own_k, own_v, 64**-0.5, causal=True)[0], rtol=1e-5, atol=1e-5)
    chain.release()
    assert blocks_in_use() == before


@pytest.mark.parametrize("config, present, users", [
    (FedAttnConfig(sync_interval=1), range(4), [0, 1, 2, 3]),
    (FedAttnConfig(sync_interval=1), [0, 2, 3], []),  # participant 1 is not in this step: no chain reaches past 0
    (FedAttnConfig(sync_interval=1), [0, 1, 3], [0, 1]),
    (FedAttnConfig(sync_interval=1, kv_wire=KVWire.INT8), range(4), []),  # they see decoded K/V, not the rows
    (FedAttnConfig(sync_interval=1, kv_share_ratio=0.5), range(4), []),  # only some of each segment is seen
    (FedAttnConfig(sync_interval=1, local_keep_ratio=0.5), range(4), []),  # own tokens masked
])
def test_a_chain_serves_exactly_the_participants_whose_keys_are_its_first_rows(config, present, users):
    batch, _ = _batch(config, present)
    _, key, value = _kv(batch)
    chains, keepers = _key_chains(batch, 0, key, value, _paging())
    assert sorted(batch.entries[i].participant for i in chains) == users
    for held, _, _ in keepers:
        held.release()


def test_no_chain_off_vllms_kernel():
    batch, _ = _batch(FedAttnConfig(sync_interval=1))
    _, key, value = _kv(batch)
    assert _key_chains(batch, 0, key, value, None) == ({}, [])
