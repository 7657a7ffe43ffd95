"""FedAttn under vLLM's tensor parallelism: each rank holds, publishes and fetches its own heads' K/V.

TP = 2 on the tiny model (vLLM's CPU backend, a core per rank; its one KV head replicated on both ranks)
against TP = 1, itself held to the oracle in tests/test_engine.py.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY_ENGINE_ARGS, federated_engine, load_hf, random_case

from fedattn_vllm.config import KVWire
from fedattn_vllm.cost import ModelShape, participant_costs

MODEL = "tiny-qwen2"


@pytest.fixture(scope="module")
def tp2():
    from fedattn_vllm.engine import FederatedLLM

    llm = FederatedLLM(MODEL, **TINY_ENGINE_ARGS, tensor_parallel_size=2)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("selections", [("random", "key_norm"), ("question",)])
def test_tp2_equals_tp1_token_for_token_and_bytes_match_the_cost_model(tp2, selections):
    """Data-dependent choices (key norm, the questions' attention, sparse local computation) are made over every
    rank's heads, so both ranks pick what one device would; replicated K/V heads are counted once."""
    tp1 = federated_engine(MODEL)
    rng = random.Random(f"tp2-{selections}")
    cases = [random_case(rng, len(tp1.tokenizer), tp1.num_layers, (KVWire.NATIVE, KVWire.INT8, KVWire.K4V2),
                         selections) for _ in range(16)]
    expected = tp1.generate([case.session() for case in cases])
    results = tp2.generate([case.session() for case in cases])
    shape = ModelShape.from_hf_config(load_hf(MODEL)[0].config, torch.float32)
    for case, got, want in zip(cases, results, expected):
        assert got.error is None and want.error is None, case
        assert {g: o.token_ids for g, o in got.outputs.items()} == {g: o.token_ids for g, o in want.outputs.items()}
        costs = participant_costs(shape, case.config.resolve(tp2.num_layers, len(case.segments)), case.lengths,
                                  len(case.prefix))
        assert got.cost.published_bytes == [c.upload_bytes for c in costs], case
        assert got.cost.received_bytes == [c.download_bytes for c in costs], case
    assert tp2.holdings() == {"sessions": 0, "requests": 0, "unfinished": 0}  # nothing left on either rank


def test_a_federated_engine_refuses_tensor_parallelism(tp2):
    from fedattn_vllm.engine import FedAttnEngineError
    from fedattn_vllm.federated.engine import EngineServer

    with pytest.raises(FedAttnEngineError, match="tensor_parallel_size"):
        EngineServer(tp2, "tcp://127.0.0.1:0", "tcp://127.0.0.1:1", control_key=b"k" * 32)
