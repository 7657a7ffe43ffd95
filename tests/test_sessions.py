"""The worker's session registry: an idle worker keeps its paged pools' memory a while, then gives it back."""

import time

import pytest
import torch

from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.exchange import InProcessKVExchange
from fedattn_vllm.vllm_ext.sessions import ParticipantMetadata, SessionRegistry
from kernels.paged import PagedKeys, available, pool_for

pytestmark = pytest.mark.skipif(not available("cpu"), reason="this vLLM build has no CPU attention kernel")


def _session_holding_blocks(registry: SessionRegistry, session_id: str):
    """A session of `registry` whose decode keys hold blocks of a pool of its own layout; (its pool)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    plan = FedAttnConfig(sync_interval=1).resolve(2, 2)
    state = registry.get_or_create(ParticipantMetadata(session_id, 1, (3, 4), 0, plan))
    like = torch.zeros(1, 3, 64)  # a head count no other test's pool has
    held = PagedKeys(pool_for(like, 16, _get_attn_isa(torch.float32, 16, 64)))
    held.append((torch.randn(40, 3, 64), torch.randn(40, 3, 64)))
    state.decode_kv[1, 0] = held
    return held.pool


def test_an_idle_worker_keeps_its_pools_memory_for_the_next_sessions():
    registry = SessionRegistry(InProcessKVExchange(), pool_idle_s=3600)
    pool = _session_holding_blocks(registry, "first")
    size = pool.blocks.shape[0]
    registry.release("first")
    assert pool.in_use == 0 and pool.blocks.shape[0] == size  # back in the pool, not given back
    _session_holding_blocks(registry, "second")
    assert pool.blocks.shape[0] == size  # the next session's blocks come from the kept memory
    registry.release("second")


def test_an_idle_worker_gives_its_pools_memory_back_after_a_while_but_not_while_a_session_holds_blocks():
    registry = SessionRegistry(InProcessKVExchange(), pool_idle_s=0.05)
    pool = _session_holding_blocks(registry, "first")
    _session_holding_blocks(registry, "second")
    registry.release("first")  # not idle: nothing scheduled
    time.sleep(0.2)
    assert pool.blocks.shape[0] > 0
    registry.release("second")
    deadline = time.monotonic() + 30
    while pool.blocks.shape[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.blocks.shape[0] == 0
