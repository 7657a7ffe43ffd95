"""The recall benchmark's cases (pure logic on the tiny tokenizer) and its CLI on the tiny model."""

import json
import subprocess
import sys
from collections import Counter

import pytest
from conftest import load_hf

from fedattn_vllm.eval.records import read_rows, rows_path
from fedattn_vllm.eval.recall_cases import KINDS, MAX_TOKENS, MIN_TOKENS, make_case, make_cases


def test_cases_are_deterministic_balanced_and_hold_the_fact_where_they_say():
    tokenizer = load_hf("tiny-qwen2")[1]
    cases = make_cases(tokenizer, 50)
    assert [c.parts for c in cases[:3]] == [c.parts for c in make_cases(tokenizer, 3)]  # same draw every time
    assert Counter((c.participants, c.kind) for c in cases) == Counter({(n, k): 2 for n in range(2, 7) for k in KINDS})
    for c in cases:
        assert 0 <= c.holder < c.participants - 1 and len(c.parts) == c.participants
        assert [c.fact.statement in p for p in c.parts] == [m == c.holder for m in range(c.participants)]
        assert c.correct(f"It is {c.fact.answer}.") and not c.correct("I do not know.")
        assert c.fact.answer not in c.parts[-1]  # the question gives nothing away
        for page in c.parts[:-1]:
            assert MIN_TOKENS <= len(tokenizer(page, add_special_tokens=False)["input_ids"]) <= MAX_TOKENS + 60


def test_cases_of_one_n_are_the_benchmarks_own_cases_of_that_n():
    tokenizer = load_hf("tiny-qwen2")[1]
    everything = make_cases(tokenizer, 30)
    sixes = make_cases(tokenizer, 4, offset=2, participants=6)
    assert [c.parts for c in sixes] == [c.parts for c in everything if c.participants == 6][2:6]
    assert {c.kind for c in make_cases(tokenizer, 5, participants=6)} == set(KINDS)
    with pytest.raises(ValueError, match="participants"):
        make_cases(tokenizer, 1, participants=7)


def test_answers_match_only_as_whole_values():
    case = next(c for c in make_cases(load_hf("tiny-qwen2")[1], 10) if c.kind == "code")
    code = case.fact.answer
    assert case.correct(f"The code is {code}") and not case.correct(f"The code is 1{code}")


def test_the_cli_scores_cases_and_writes_compressed_rows(tmp_path):
    base = [sys.executable, "-m", "fedattn_vllm.eval", "recall", "--model", "tiny-qwen2", "--dtype", "float32",
            "--count", "5", "--max-tokens", "4", "--kv-cache-gib", "0.0625", "--max-model-len", "2048",
            "--out", str(tmp_path)]
    for extra in (["--mode", "centralised"], ["-H", "3", "--generator-sync-interval", "1", "--public-prefix"]):
        subprocess.run(base + extra, check=True, capture_output=True, timeout=300)
    central = json.loads(next(tmp_path.glob("*centralised*.summary.json")).read_text())
    mode = json.loads(next(tmp_path.glob("*hg1-pp*.summary.json")).read_text())
    rows = read_rows(rows_path(tmp_path, mode["run"]))
    assert central["cases"] == mode["cases"] == len(rows) == 5 and mode["errors"] == 0
    assert central["mean_published_bytes"] == 0 and mode["mean_published_bytes"] > 0
    assert set(mode["by_participants"]) == {"2", "3", "4", "5", "6"} and mode["config"]["generator_sync_interval"] == 1
    assert all(r["prefix_tokens"] > 0 and len(r["segment_tokens"]) == r["participants"] for r in rows)
    assert mode["correct"] == sum(r["correct"] for r in rows)
