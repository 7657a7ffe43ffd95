"""GSM8K evaluation: answer extraction, confidence intervals, and the CLI end to end on the tiny model."""

import json
import subprocess
import sys

import pytest

from fedattn_vllm.eval.answers import extract_answer, is_correct
from fedattn_vllm.eval.records import read_rows, rows_path
from fedattn_vllm.eval.stats import mcnemar_exact, wilson_interval


@pytest.mark.parametrize("text,expected", [
    ("She sells 9 eggs, 9 * 2 = 18.\nThe answer is 18\n\n", "18"),
    ("The answer is 1,000. Then 7 more", "1000"),  # "The answer is" wins over the last number
    ("The answer is $42.", "42"),
    ("so the total is 18.0", "18"),  # no phrase: the last number
    ("The answer is -3.50", "-3.5"),
    ("no number at all", None),
])
def test_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_scoring_is_numeric():
    assert is_correct("1000", "1,000") and is_correct("18", "18.0") and not is_correct(None, "3")
    assert not is_correct("17", "18")


def test_wilson_interval_against_known_values():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 300)[0] == 0.0  # exactly: plots draw error bars from it (300 left 1e-18)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_mcnemar_exact_is_the_two_sided_binomial_test_on_discordant_problems():
    assert mcnemar_exact(10, 0) == mcnemar_exact(0, 10) == 2 / 2**10
    assert mcnemar_exact(28, 17) == pytest.approx(0.1352, abs=1e-4)  # R: binom.test(17, 45)$p.value
    assert mcnemar_exact(5, 5) == mcnemar_exact(0, 0) == 1.0  # no evidence either way
    with pytest.raises(ValueError, match="only_first"):
        mcnemar_exact(-1, 3)


def _cli(*args: str) -> None:
    """In its own process: an engine torn down inside the test process would take vLLM's global state along."""
    subprocess.run([sys.executable, "-m", "fedattn_vllm.eval", *args], check=True, capture_output=True, timeout=300)


def test_the_cli_runs_two_problems_on_the_tiny_model_then_fidelity_attention_and_plots(tmp_path):
    _cli("gsm8k", "--model", "tiny-qwen2", "--dtype", "float32", "--limit", "2", "--shots", "1", "--participants", "2",
         "--sync-interval", "2", "--max-tokens", "8", "--max-model-len", "1024", "--kv-cache-gib", "0.0625",
         "--out", str(tmp_path / "gsm8k"))
    [path] = (tmp_path / "gsm8k").glob("*.summary.json")
    summary = json.loads(path.read_text())
    rows = read_rows(rows_path(tmp_path / "gsm8k", summary["run"]))
    assert len(rows) == 2 and summary["problems"] == 2 and summary["errors"] == 0
    assert {"segment_tokens", "output", "predicted", "reference", "correct", "published_bytes"} <= set(rows[0])
    assert rows[1]["reference"] == "3" and len(rows[0]["segment_tokens"]) == 2
    assert 0.0 <= summary["ci95"][0] <= summary["accuracy"] <= summary["ci95"][1] <= 1.0
    assert summary["sync_layers"] == [0, 2, 4] and all(b > 0 for b in summary["mean_published_bytes"])
    assert summary["correct"] == sum(r["correct"] for r in rows)

    _cli("fidelity", "interval", "--model", "tiny-qwen2", "--dtype", "float32", "--limit", "1", "--shots", "1",
         "--out", str(tmp_path / "fidelity"))
    fidelity = json.loads((tmp_path / "fidelity" / "interval.json").read_text())
    exact = fidelity["variants"][0]
    assert exact["label"] == "H=1" and exact["agreement"] == 1.0 and max(exact["layer_deviation"]) < 1e-5
    assert len(fidelity["per_problem"]) == 1 and fidelity["num_layers"] + 1 == len(exact["layer_deviation"])

    _cli("attention", "combined", "--model", "tiny-qwen2", "--dtype", "float32", "--limit", "1", "--shots", "1",
         "--out", str(tmp_path / "attention"))
    masses = {v["label"]: v for v in json.loads((tmp_path / "attention" / "combined.json").read_text())["variants"]}
    assert len(masses["centralised"]["foreign"]) == fidelity["num_layers"]
    assert not any(masses["no sync (generator alone)"]["foreign"]) and any(masses["centralised"]["foreign"])

    _cli("plots", "--results", str(tmp_path))
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"fidelity_layers.png", "fidelity_summary.png", "attention.png", "tables.md"} <= figures  # no frontier


def test_run_names_tell_settings_apart_and_publisher_dense_keeps_the_last_participant_whole():
    from fedattn_vllm.eval.__main__ import parse_args
    from fedattn_vllm.eval.accuracy import run_name, share_ratio

    base = ["gsm8k", "-N", "3", "--limit", "100", "--kv-share-ratio", "0.5"]
    names = {run_name(parse_args(base + extra)) for extra in
             ([], ["--kv-selection", "key_norm"], ["--publisher-dense"], ["--publisher-sync-interval", "2"],
              ["--offset", "100"], ["--seed", "1"], ["--split", "SemEx"], ["--placement", "back_half"],
              ["--local-keep-ratio", "0.5"])}
    assert len(names) == 9
    local = ["gsm8k", "-N", "4", "--local-keep-ratio", "0.7"]  # every token shared: the selection is the local one's
    assert run_name(parse_args(local)) != run_name(parse_args(local + ["--kv-selection", "key_norm"]))
    assert share_ratio(parse_args(base + ["--publisher-dense"])) == (0.5, 0.5, 1.0)
    assert share_ratio(parse_args(base)) == 0.5
