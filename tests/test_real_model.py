"""The oracle on the real default model (Qwen2.5-Coder-0.5B-Instruct, fp32)."""

import pytest
import torch
from torch.testing import assert_close

from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.oracle import FedAttnOracle
from fedattn_vllm.prompting import encode_segments

pytestmark = pytest.mark.slow

FACT = "Warehouse log: the access code for the blue door is 4817. "
QUESTION = "Question: what is the access code for the blue door? Answer with the number only."


def answer(real_model, config):
    model, tokenizer = real_model
    prefix, segments = encode_segments(tokenizer, [FACT, QUESTION], chat=True)
    out = FedAttnOracle(model).generate(segments, config, 12, public_prefix=prefix)
    return tokenizer.decode(out.tokens[1], skip_special_tokens=True)


def test_the_question_holder_learns_the_fact_only_through_sync_layers(real_model):
    assert answer(real_model, FedAttnConfig(sync_interval=1)).strip() == "4817"
    assert "4817" not in answer(real_model, FedAttnConfig(placement="explicit", sync_layers=()))
    print(f"\nH=4 answers {answer(real_model, FedAttnConfig(sync_interval=4))!r}")


def test_the_generator_reading_every_layer_learns_the_fact_the_paper_misses(real_model):
    config = FedAttnConfig(sync_interval=4, generator_sync_interval=1)
    assert answer(real_model, config).strip() == "4817"


def test_h1_equals_plain_inference_on_the_real_model(real_model):
    model, tokenizer = real_model
    prefix, segments = encode_segments(tokenizer, [FACT, QUESTION], chat=True)
    ids = prefix + [t for s in segments for t in s]
    out = FedAttnOracle(model).generate(segments, FedAttnConfig(sync_interval=1), 1, output_prompt_logits=True,
                                        public_prefix=prefix)
    assert_close(out.prompt_logits, model(torch.tensor([ids])).logits[0].float(), rtol=1e-4, atol=1e-4)
