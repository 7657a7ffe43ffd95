"""Fidelity measures on the reference oracle (tiny random models, fp32) and the teacher-forcing setup."""

import pytest
import torch
from conftest import load_hf

from fedattn_vllm import gsm8k
from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.eval.fidelity import SWEEPS, Variant, compare, measure, summarise, teacher_forced_segments
from fedattn_vllm.oracle import FedAttnOracle

PROBLEM = gsm8k.problems()[1]  # "A robe takes 2 bolts ...": short


def test_solution_text_drops_calculator_annotations_and_ends_like_an_exemplar():
    assert gsm8k.solution_text(PROBLEM) == (
        "It takes 2/2=1 bolt of white fiber\nSo the total amount of fabric is 2+1=3 bolts of fabric\n"
        "The answer is 3\n\n")


@pytest.fixture(scope="module")
def qwen():
    model, tokenizer = load_hf("tiny-qwen2")
    return FedAttnOracle(model), tokenizer


def test_teacher_forcing_appends_the_solution_to_the_generator_only(qwen):
    _, tokenizer = qwen
    segments, answer_len = teacher_forced_segments(tokenizer, PROBLEM, 2, 3, "TokEx")
    prompt = gsm8k.segments(tokenizer, PROBLEM, 2, 3, "TokEx")
    assert segments[:2] == prompt[:2] and segments[2][: len(prompt[2])] == prompt[2]
    assert tokenizer.decode(segments[2][len(prompt[2]):]) == gsm8k.solution_text(PROBLEM)
    assert answer_len == len(segments[2]) - len(prompt[2])


def test_exact_settings_match_centralised_and_sparser_ones_deviate(qwen):
    oracle, tokenizer = qwen
    variants = [Variant("H=1", 4, FedAttnConfig(sync_interval=1)), Variant("N=1", 1, FedAttnConfig(sync_interval=4)),
                Variant("H=4", 4, FedAttnConfig(sync_interval=4)), Variant("none", 4, FedAttnConfig(sync_interval=99)),
                Variant("key_norm", 4, FedAttnConfig(sync_interval=1, kv_share_ratio=0.3, kv_selection="key_norm"))]
    results = measure(oracle, tokenizer, PROBLEM, variants, 2, lambda plan, lengths: [7] * len(lengths))
    exact, single, h4, none, sparse = results
    for r in (exact, single):  # the spec's edge cases: nothing changes
        assert r.agreement == 1.0 and r.kl == pytest.approx(0.0, abs=1e-6) and max(r.layer_deviation) < 1e-5
    assert len(h4.layer_deviation) == oracle.num_layers + 1 and h4.layer_deviation[0] == 0.0  # embeddings are local
    assert none.layer_deviation[-1] > 0.0 and none.kl > 0.0 and sparse.kl > 0.0
    assert h4.published_bytes == [7, 7, 7, 7]
    [row] = summarise(variants[2:3], [[h4], [h4]])
    assert row["agreement"] == h4.agreement and row["agreement_sem"] == 0.0 and row["problems"] == 2
    assert row["config"]["sync_interval"] == 4 and row["config"]["placement"] == "uniform"


def test_compare_measures_kl_agreement_and_nll_on_the_answer_positions():
    tokens = torch.tensor([5, 1, 2])  # the answer is the last two tokens
    hidden = torch.ones(3, 3, 4)
    sure = torch.full((2, 4), -10.0)
    sure[0, 1] = sure[1, 2] = 10.0  # centralised predicts the answer
    unsure = torch.zeros(2, 4)  # uniform
    deviation, agreement, kl, nll_change = compare((sure, hidden), (unsure, hidden * 2), tokens, 1)
    assert deviation == pytest.approx([1.0, 1.0, 1.0])
    assert kl > 0 and nll_change == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-3)
    assert agreement == 0.0  # uniform logits pick token 0; the answer is tokens 1 and 2
    _, agreement, kl, nll_change = compare((sure, hidden), (sure, hidden), tokens, 1)
    assert agreement == 1.0 and kl == 0.0 and nll_change == 0.0


def test_sweeps_cover_the_issue_grid():
    assert [v.config.sync_interval for v in SWEEPS["interval"]] == [1, 2, 3, 4, 6, 8, 12, 24]
    assert [v.participants for v in SWEEPS["participants"]] == [1, 2, 3, 4, 5, 6]
    assert {v.config.kv_selection for v in SWEEPS["sparse"]} == {"random", "key_norm"}
    assert {v.split for v in SWEEPS["split"]} == {"TokAg", "SemAg", "TokEx", "SemEx"}
