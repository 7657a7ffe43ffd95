"""Attention-mass measures on the reference oracle (tiny random Qwen2, fp32, eager attention)."""

import pytest
import torch
from conftest import load_hf

from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.eval.attention import attention_mass, recorded_attention
from fedattn_vllm.oracle import FedAttnOracle

SEGMENTS = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35]]  # the generator's own tokens start at 7


@pytest.fixture(scope="module")
def oracle():
    model, _ = load_hf("tiny-qwen2")
    return FedAttnOracle(model)


def test_foreign_attention_only_at_sync_layers_and_none_without_sync(oracle):
    h2 = attention_mass(oracle, SEGMENTS, FedAttnConfig(sync_interval=2))
    sync = set(FedAttnConfig(sync_interval=2).sync_layers_for(oracle.num_layers))
    for layer in range(oracle.num_layers):
        assert (h2.foreign[layer] > 0) == (layer in sync)
        assert h2.foreign_first[layer] <= h2.foreign[layer] + 1e-6 and 0 < h2.own_first[layer] <= 1
    alone = attention_mass(oracle, SEGMENTS, FedAttnConfig(placement="explicit", sync_layers=()))
    assert alone.foreign == [0.0] * oracle.num_layers == alone.foreign_first


def test_centralised_masses_are_the_causal_attention_probabilities(oracle):
    mass = attention_mass(oracle, SEGMENTS, FedAttnConfig(sync_interval=1))
    tokens = torch.tensor([[t for s in SEGMENTS for t in s]])
    with torch.no_grad():
        probs = oracle.model(tokens, output_attentions=True).attentions  # per layer (1, heads, L, L)
    for layer, p in enumerate(probs):
        rows = p[0].mean(0)[7:]
        assert mass.foreign[layer] == pytest.approx(rows[:, :7].sum(-1).mean().item(), abs=1e-5)
        assert mass.foreign_first[layer] == pytest.approx(rows[:, [0, 4]].sum(-1).mean().item(), abs=1e-5)
        assert mass.own_first[layer] == pytest.approx(rows[:, 7].mean().item(), abs=1e-5)


def test_recording_needs_eager_attention_and_leaves_no_hooks(oracle):
    def hooks():
        return [dict(layer.self_attn._forward_hooks) for layer in oracle.decoder.layers]

    before = hooks()
    with recorded_attention(oracle) as probs:
        oracle.generate(SEGMENTS, FedAttnConfig(sync_interval=1), 1)
    assert sorted(probs) == list(range(oracle.num_layers)) and hooks() == before
    oracle.model.config._attn_implementation = "sdpa"
    try:
        with pytest.raises(ValueError, match="eager"), recorded_attention(oracle):
            oracle.generate(SEGMENTS, FedAttnConfig(sync_interval=1), 1)
    finally:
        oracle.model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="generators"):
        attention_mass(oracle, SEGMENTS, FedAttnConfig(sync_interval=1, generators=(0,)))
