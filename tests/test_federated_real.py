"""Federated mode on the real default model (Qwen2.5-Coder-0.5B-Instruct, fp32): same tokens as colocated."""

import pytest
from conftest import REAL_ENGINE_ARGS, federated_engine
from vllm import SamplingParams

from fedattn_vllm import gsm8k
from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.session import FedAttnSession
from fedattn_vllm.federated.local import LocalCluster

pytestmark = pytest.mark.slow

# The engine processes get a small K/V cache: this test process already holds the model twice (HF, vLLM).
CLUSTER_ENGINE_ARGS = {**REAL_ENGINE_ARGS, "max_num_batched_tokens": 4096, "kv_cache_memory_bytes": 256 << 20}


def test_gsm8k_tokex_n4_h4_on_two_engines_equals_colocated(tmp_path):
    colocated = federated_engine("default", **REAL_ENGINE_ARGS)
    problems = gsm8k.problems()[:3]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    sessions = [FedAttnSession(gsm8k.segments(colocated.tokenizer, p, 4, 4, "TokEx"), FedAttnConfig(sync_interval=4),
                               params) for p in problems]
    with LocalCluster("default", engines=2, engine_args=CLUSTER_ENGINE_ARGS, timeout_s=120,
                      log_dir=tmp_path) as local:
        federated = local.cluster.generate(sessions, placement=[[0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 1, 1]])
    expected = colocated.generate(sessions)
    for result, reference in zip(federated, expected):
        assert result.error is None
        assert result.outputs[3].token_ids == reference.outputs[3].token_ids
        assert result.cost.published_bytes == reference.cost.published_bytes
        assert result.cost.received_bytes == reference.cost.received_bytes
    overhead = [(sum(r.cost.published_wire_bytes) + sum(r.cost.received_wire_bytes))
                / (sum(r.cost.published_bytes) + sum(r.cost.received_bytes)) - 1 for r in federated]
    print(f"\nwire framing overhead on real K/V: {100 * max(overhead):.3f}% at most")
    assert max(overhead) < 0.01
