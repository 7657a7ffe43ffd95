import subprocess
import sys

import pytest

import torch

from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.selection import QUESTION_POOL, KeyNormSelector, QuestionSelector, RandomSelector, derive_seed, kept_count


@pytest.mark.parametrize(
    "length, ratio, count", [(10, 1.0, 10), (10, 0.3, 3), (10, 0.25, 3), (10, 0.01, 1), (1, 0.1, 1), (7, 0.5, 4)]
)
def test_kept_count_rounds_up_and_keeps_at_least_one(length, ratio, count):
    assert kept_count(length, ratio) == count


def test_random_selection_is_reproducible_and_fresh_per_layer_and_participant():
    sel = RandomSelector()
    pick = lambda **kw: sel.select(100, 30, **{"seed": 0, "participant": 0, "layer": 0, "purpose": "share", **kw}).tolist()
    first = pick()
    assert first == pick() and len(set(first)) == 30 and first == sorted(first)
    assert all(0 <= i < 100 for i in first)
    assert first != pick(layer=4) and first != pick(participant=1) and first != pick(seed=1)
    assert first != pick(purpose="keep")


def test_seeds_do_not_depend_on_the_process():
    code = "from fedattn_vllm.selection import derive_seed; print(derive_seed('share', 0, 1, 4))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == derive_seed("share", 0, 1, 4)


def test_key_norm_selection_keeps_the_lowest_norm_keys_in_order():
    keys = torch.ones(6, 2, 4)  # (length, H_kv, D)
    keys[[1, 4]] *= 0.1  # the two smallest norms
    keys[3, 0] *= 0.5  # third smallest: head-averaged norm
    picked = KeyNormSelector().select(6, 3, seed=0, participant=0, layer=0, purpose="share", keys=keys)
    assert picked.tolist() == [1, 3, 4] and picked.dtype == torch.int64


def test_key_norm_selection_needs_the_keys_and_ignores_the_seed():
    plan = FedAttnConfig(kv_share_ratio=0.5, kv_selection="key_norm").resolve(4, 2)
    with pytest.raises(ValueError, match="key_norm"):
        plan.shared_positions(0, 0, 6)
    keys = torch.randn(6, 2, 4)
    reseeded = FedAttnConfig(kv_share_ratio=0.5, kv_selection="key_norm", seed=7).resolve(4, 2)
    assert plan.shared_positions(0, 0, 6, keys).tolist() == reseeded.shared_positions(0, 0, 6, keys).tolist()
    assert plan.shared_positions(0, 0, 6, keys).tolist() != plan.shared_positions(0, 0, 6, -keys * torch.arange(6.0)[:, None, None]).tolist()


def test_question_selection_keeps_the_span_a_question_head_looks_at():
    length, d = 60, 8
    keys = torch.zeros(length, 2, d)  # (length, H_kv, D): every key alike but one
    keys[40, 1, 0] = 30.0  # KV head 1, channel 0
    queries = torch.zeros(3, 4, d)  # (rows, H, D): H=4 query heads share 2 KV heads
    queries[2, 3, 0] = 1.0  # one row of query head 3 (KV head 1) looks for it
    picked = QuestionSelector().select(length, QUESTION_POOL, seed=0, participant=0, layer=0, purpose="share",
                                       keys=keys, queries=queries).tolist()
    half = QUESTION_POOL // 2
    assert picked == list(range(40 - half, 40 + half + 1))  # the token and its neighbours, in order
    # a head of the other KV group sees nothing to prefer: ties keep the earliest tokens
    queries = torch.zeros(3, 4, d)
    queries[0, 0, 0] = 1.0
    assert QuestionSelector().select(length, 5, seed=0, participant=0, layer=0, purpose="share", keys=keys,
                                     queries=queries).tolist() == [0, 1, 2, 3, 4]


def test_question_selection_without_a_question_falls_back_to_key_norms_and_needs_the_keys():
    keys = torch.randn(10, 2, 4)
    args = dict(seed=0, participant=0, layer=0, purpose="share", keys=keys)
    assert (QuestionSelector().select(10, 4, **args, queries=torch.zeros(0, 4, 4)).tolist()
            == KeyNormSelector().select(10, 4, **args).tolist())
    with pytest.raises(ValueError, match="question"):
        QuestionSelector().select(10, 4, seed=0, participant=0, layer=0, purpose="share")


def test_question_askers_are_the_other_generators():
    plan = FedAttnConfig(kv_share_ratio=0.5, kv_selection="question", generators=[1, 3]).resolve(4, 4)
    assert plan.question_askers(0) == (1, 3) and plan.question_askers(1) == (3,)
    assert plan.selection_needs_queries and not FedAttnConfig(kv_selection="key_norm").resolve(4, 2).selection_needs_queries
