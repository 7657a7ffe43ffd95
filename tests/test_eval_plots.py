"""The figures and tables of RESULTS.md, regenerated from a tiny saved result in the CLI's formats."""

import argparse
import json

import pytest

from fedattn_vllm.eval import plots
from fedattn_vllm.eval.records import rows_path, write_rows


def _accuracy_run(directory, n, h, correct, offset=0, shots=4, ratio=1.0, selection="random", placement="uniform"):
    """One `gsm8k` run as the CLI saves it: <run>.jsonl.gz and <run>.summary.json."""
    name = f"N{n}-H{h}-{placement}-{shots}-r{ratio}-{selection}-o{offset}"
    args = {"participants": n, "sync_interval": h, "placement": placement, "split": "TokEx", "shots": shots,
            "kv_share_ratio": ratio, "kv_selection": selection, "publisher_sync_interval": None}
    rows = [{"index": offset + i, "correct": i < correct, "published_bytes": [1024 * h] * n}
            for i in range(4)]
    write_rows(rows_path(directory, name), rows)
    summary = {"run": name, "args": args, "problems": 4, "mean_prefill_flops": [2e9 * (offset + 1)] * n}
    (directory / f"{name}.summary.json").write_text(json.dumps(summary))


def _recall_run(directory, label, outcomes, offset=0):
    """One `recall` run as the CLI saves it (cases alternate N = 2, 3)."""
    name = f"tiny-float32-recall-{label}-o{offset}-n{len(outcomes)}-s0"
    rows = [{"index": offset + i, "participants": 2 + i % 2, "correct": ok} for i, ok in enumerate(outcomes)]
    write_rows(rows_path(directory, name), rows)
    summary = {"run": name, "mean_published_bytes": 2048.0 if label != "centralised" else 0,
               "mean_prefill_flops": 1e9 * (offset + 1)}
    (directory / f"{name}.summary.json").write_text(json.dumps(summary))


def _fidelity_sweep(directory, sweep, labels):
    variants = [{"label": label, "participants": 4, "split": "TokEx", "problems": 2,
                 "config": {"kv_selection": "key_norm" if "key" in label else "random"},
                 "agreement": 0.9 - 0.1 * i, "agreement_sem": 0.02, "kl": 0.1 * i, "kl_sem": 0.01,
                 "nll_change": 0.05 * i, "layer_deviation": [0.0, 0.1 * i, 0.2 * i],
                 "mean_published_bytes": [2048.0 / (i + 1)] * 4} for i, label in enumerate(labels)]
    result = {"sweep": sweep, "problems": 2, "shots": 4, "dtype": "bfloat16", "variants": variants}
    (directory / f"{sweep}.json").write_text(json.dumps(result))


@pytest.fixture
def saved(tmp_path):
    gsm, fid = tmp_path / "gsm8k", tmp_path / "fidelity"
    gsm.mkdir(), fid.mkdir()
    _accuracy_run(gsm, 1, 1, correct=3)
    _accuracy_run(gsm, 1, 1, correct=2, shots=0)  # the question alone
    _accuracy_run(gsm, 4, 4, correct=2)
    _accuracy_run(gsm, 4, 4, correct=1, offset=4)  # a second shard of the same setting
    _accuracy_run(gsm, 4, 8, correct=1)
    _accuracy_run(gsm, 4, 4, correct=1, placement="back_half")
    _accuracy_run(gsm, 4, 4, correct=0, ratio=0.5, selection="key_norm")
    _accuracy_run(gsm, 4, 4, correct=3, ratio=0.5, selection="random")
    for n in (1, 2, 4):
        _accuracy_run(gsm, n, 4, correct=n % 3, shots=8)
    _fidelity_sweep(fid, "interval", ["H=1", "H=4", "H=24"])
    _fidelity_sweep(fid, "participants", ["N=1", "N=4"])
    _fidelity_sweep(fid, "sparse", ["random r=1", "random r=0.5", "key_norm r=1", "key_norm r=0.5"])
    _fidelity_sweep(fid, "combined", ["no sync", "back_half"])
    recall = tmp_path / "recall"
    recall.mkdir()
    _recall_run(recall, "centralised", [True, True, True, False])
    _recall_run(recall, "H4-uniform-hg1-pp", [True, False, False, False])
    _recall_run(recall, "H4-uniform-hg1-pp", [True, True], offset=4)  # a second shard
    _recall_run(recall, "centralised-N6", [False, True])  # runs on one N's cases (--participants)
    _recall_run(recall, "H4-uniform-hg1-pp-N6", [True, True])
    combined = json.loads((fid / "combined.json").read_text())
    combined["variants"][0]["config"] |= {"placement": "explicit", "sync_layers": []}
    (fid / "combined.json").write_text(json.dumps(combined))
    return tmp_path


def test_shards_of_one_setting_merge_and_settings_stay_apart(saved):
    runs = plots.load_accuracy(saved / "gsm8k")
    by_label = {s.label: a for s, a in runs.items()}
    merged = by_label["N=4 H=4 TokEx uniform 4-shot"]
    assert (merged.problems, merged.correct) == (8, 3) and merged.prefill_flops == pytest.approx(6e9)
    assert by_label["centralised, 4-shot"].accuracy == 0.75 and by_label["centralised, 4-shot"].published_bytes == 0
    assert by_label["N=4 H=4 TokEx uniform 4-shot r=0.5 key_norm"].published_bytes == 4096
    assert by_label["question alone, 0-shot"].accuracy == 0.5
    assert len(runs) == 10


def test_one_command_regenerates_every_figure_and_the_tables(saved):
    made = plots.run(argparse.Namespace(results=saved, out=None))
    names = {p.name for p in made}
    assert names == {"accuracy_vs_interval.png", "accuracy_vs_participants.png", "placement.png", "sparse.png",
                     "frontier.png", "fidelity_layers.png", "fidelity_summary.png", "recall.png", "tables.md"}
    for path in made:
        assert path.parent == saved / "figures" and path.stat().st_size > 1000
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = (saved / "figures" / "tables.md").read_text()
    assert "| N=4 H=4 TokEx uniform 4-shot | 8 | 37.5% |" in tables
    assert "| key_norm r=0.5 | 0.600 ± 0.020 |" in tables


def test_paired_tables_compare_on_the_problems_both_runs_scored(saved):
    tables = "\n".join(plots.paired_tables(plots.load_accuracy(saved / "gsm8k")))
    against_centralised, against_alone, key_norm_vs_random = tables.split("### ")[1:]
    # indices 0-3 in common (the second shard, 4-7, has no centralised run): 0, 1 right in both, 2 only centralised
    assert "| N=4 H=4 TokEx uniform 4-shot | 4 | 50.0% | 75.0% | 0 | 1 | 1 |" in against_centralised
    assert "| N=4 H=4 TokEx uniform 8-shot | 4 | 25.0% | 25.0% | 0 | 0 | 1 |" in against_centralised
    assert "| N=4 H=4 TokEx back_half 4-shot | 4 | 25.0% | 50.0% | 0 | 1 | 1 |" in against_alone
    assert "centralised" not in against_alone.split("|---|")[1]  # N=1 runs are references, not rows
    # equal bytes: the same setting but for the selection; 3 discordant problems all one way: p = 2 / 2**3
    assert key_norm_vs_random.splitlines()[4:] == ["| N=4 H=4 TokEx uniform 4-shot r=0.5 key_norm | 4 | 0.0% "
                                                   "| 75.0% | 0 | 3 | 0.25 |"]


def test_recall_shards_merge_and_pair_with_centralised(saved):
    from fedattn_vllm.eval import recall_report

    runs = recall_report.load_recall(saved / "recall")
    mode = runs["H4-uniform-hg1-pp"]
    assert mode.accuracy()[0] == 0.5 and mode.accuracy(2)[3] == 3 and mode.prefill_flops == pytest.approx(7e9 / 3)
    tables = "\n".join(recall_report.tables(runs))
    assert "| H4-uniform-hg1-pp | 6 | 50.0% | 18.8-81.2% | 67% | 33% | 2 | 2.3 |" in tables
    assert "| H4-uniform-hg1-pp | 4 | 2 | 0 | 0.5 |" in tables  # cases 0-3 in common: 1 and 2 only centralised
    assert "| H4-uniform-hg1-pp-N6 | 2 | 0 | 1 | 1 |" in tables  # paired with centralised on the same N only


def test_runs_of_another_model_get_their_own_table_and_never_merge(saved):
    from fedattn_vllm.eval import recall_report

    recall, other = saved / "recall", "other-model-1.5b"
    for path in recall.glob("tiny-float32-recall-centralised-o0-n4-s0.*"):  # the same run, of another model
        copy = path.read_bytes().replace(b"tiny-", f"{other}-".encode())
        (recall / path.name.replace("tiny-", f"{other}-")).write_bytes(copy)
    with pytest.raises(ValueError, match="name the model"):
        recall_report.load_recall(recall)
    assert recall_report.recall_models(recall) == ["other-model-1.5b", "tiny"]
    assert set(recall_report.load_recall(recall, other)) == {"centralised"}
    assert len(recall_report.load_recall(recall, "tiny")) == 4
    plots.run(argparse.Namespace(results=saved, out=None))
    tables = (saved / "figures" / "tables.md").read_text()
    assert "### Cross-party recall\n" in tables and "### Cross-party recall, tiny\n" in tables


def test_the_no_sync_variant_is_found_by_its_config(saved):
    fidelity = plots.load_sweeps(saved / "fidelity")
    assert plots._no_sync_variant(fidelity)["label"] == "no sync"
    del fidelity["combined"]
    assert plots._no_sync_variant(fidelity) is None


def test_missing_results_skip_their_figures(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    _accuracy_run(tmp_path / "gsm8k", 1, 1, correct=1)
    made = plots.run(argparse.Namespace(results=tmp_path, out=tmp_path / "out"))
    assert [p.name for p in made] == ["tables.md"]
