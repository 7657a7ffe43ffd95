"""FedAttn in vLLM against the oracle on the real default model (Qwen2.5-Coder-0.5B-Instruct, fp32)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REAL_ENGINE_ARGS, federated_engine
from vllm import SamplingParams

from fedattn_vllm import gsm8k
from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.session import FedAttnSession
from fedattn_vllm.oracle import FedAttnOracle

pytestmark = pytest.mark.slow

PROBLEMS, SHOTS, PARTICIPANTS, NEW_TOKENS, TOP = 10, 4, 4, 64, 20


def test_gsm8k_tokex_n4_h4_first_64_tokens_match_the_oracle(real_model):
    model, tokenizer = real_model
    llm = federated_engine("default", **REAL_ENGINE_ARGS)
    config = FedAttnConfig(sync_interval=4)
    problems = gsm8k.problems()[:PROBLEMS]
    prompts = [gsm8k.segments(tokenizer, p, SHOTS, PARTICIPANTS, "TokEx") for p in problems]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP)
    results = llm.generate([FedAttnSession(segments, config, params) for segments in prompts])
    oracle = FedAttnOracle(model)
    identical, largest_gap = 0, 0.0
    for segments, result in zip(prompts, results):
        expected = oracle.generate(segments, config, NEW_TOKENS, ignore_eos=True)
        generated = result.outputs[PARTICIPANTS - 1]
        identical += generated.token_ids == expected.tokens[PARTICIPANTS - 1]
        # First-token log-probabilities (logits up to a shared constant) over vLLM's top 20.
        reference = torch.log_softmax(expected.first_logits[PARTICIPANTS - 1], dim=-1)
        first = generated.logprobs[0]
        largest_gap = max(largest_gap, max(abs(lp.logprob - reference[t].item()) for t, lp in first.items()))
    print(f"\n{identical}/{PROBLEMS} identical for {NEW_TOKENS} tokens; "
          f"largest first-token log-prob difference {largest_gap:.2e}")
    assert identical >= PROBLEMS - 1
    assert largest_gap < 1e-2


def test_the_generator_reading_every_layer_with_a_public_prefix_matches_the_oracle_on_recall_cases(real_model):
    from fedattn_vllm.eval.recall import session_parts
    from fedattn_vllm.eval.recall_cases import make_cases

    model, tokenizer = real_model
    llm = federated_engine("default", **REAL_ENGINE_ARGS)
    config = FedAttnConfig(sync_interval=4, generator_sync_interval=1)
    cases = make_cases(tokenizer, 5)  # N = 2..6
    prompts = [session_parts(tokenizer, case, "federated", public_prefix=True) for case in cases]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    results = llm.generate([FedAttnSession(s, config, params, public_prefix=p) for p, s in prompts])
    oracle = FedAttnOracle(model)
    identical = 0
    for (prefix, segments), result in zip(prompts, results):
        expected = oracle.generate(segments, config, 16, ignore_eos=True, public_prefix=prefix)
        identical += result.outputs[len(segments) - 1].token_ids == expected.tokens[len(segments) - 1]
    print(f"\n{identical}/{len(cases)} identical for 16 tokens")
    assert identical >= len(cases) - 1


@pytest.mark.parametrize("wire", ["int4", "k4v2"])  # int2 loses a fifth of the answers (RESULTS.md)
def test_low_bit_kv_on_the_wire_keeps_the_recall_answers_of_exact_kv(wire):
    """The recall mode (the generator reads every layer, public prefix) with 2-4 bit K/V answers as exact K/V does."""
    from fedattn_vllm.eval.recall import session_parts
    from fedattn_vllm.eval.recall_cases import make_cases

    llm = federated_engine("default", **REAL_ENGINE_ARGS)
    cases = make_cases(llm.tokenizer, 10)  # N = 2..6, every kind of fact
    prompts = [session_parts(llm.tokenizer, case, "federated", public_prefix=True) for case in cases]
    params = SamplingParams(temperature=0.0, max_tokens=24)

    def answers(config: FedAttnConfig) -> list[bool]:
        results = llm.generate([FedAttnSession(s, config, params, public_prefix=p) for p, s in prompts])
        return [case.correct(r.outputs[len(s) - 1].text) for case, (_, s), r in zip(cases, prompts, results)]

    exact = answers(FedAttnConfig(sync_interval=2, generator_sync_interval=1))
    encoded = answers(FedAttnConfig(sync_interval=2, generator_sync_interval=1, kv_wire=wire))
    print(f"\nrecall answers: exact K/V {sum(exact)}/{len(cases)}, {wire} {sum(encoded)}/{len(cases)}")
    assert sum(exact) >= 8 and sum(a and b for a, b in zip(exact, encoded)) >= sum(exact) - 1


def test_the_readme_example_starts_with_no_engine_arguments():
    """FederatedLLM("default", dtype="float32") as the README writes it: the model's own 32768-token context,
    so one engine step (no chunked prefill) must hold that many tokens. In its own process: shutting an engine
    down tears down vLLM's process-wide parallel state, which the engines this test run shares still use."""
    script = textwrap.dedent("""
        from vllm import SamplingParams
        from fedattn_vllm import FedAttnConfig, FedAttnSession, FederatedLLM

        llm = FederatedLLM("default", dtype="float32")
        assert llm.max_model_len == 32768 and llm.engine.max_batched_tokens >= llm.max_model_len
        [result] = llm.generate([FedAttnSession(["Alice's notes: the door code is 4417.", "Question: the door code?"],
                                                FedAttnConfig(), SamplingParams(temperature=0.0, max_tokens=4))])
        assert result.error is None and len(result.outputs[1].token_ids) == 4
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
