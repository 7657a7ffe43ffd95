"""Recall figures and tables from `<results>/recall/*.summary.json` (part of `python -m fedattn_vllm.eval plots`).

Runs of one setting made with --offset are merged case by case (each case counted once).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from fedattn_vllm.eval.records import read_rows, rows_path
from fedattn_vllm.eval.stats import mcnemar_exact, wilson_interval


@dataclass
class RecallRun:
    label: str  # the run name without model, dtype, offset, count and seed
    rows: dict[int, dict]  # case index -> its row
    published_bytes: float  # mean per participant (0 for one participant)
    prefill_flops: float  # mean per participant (modelled)

    def outcomes(self, participants: int | None = None) -> dict[int, bool]:
        return {i: bool(r["correct"]) for i, r in self.rows.items()
                if participants is None or r["participants"] == participants}

    def accuracy(self, participants: int | None = None) -> tuple[float, float, float, int]:
        """(accuracy, CI low, CI high, cases)."""
        outcomes = self.outcomes(participants)
        correct = sum(outcomes.values())
        return (correct / len(outcomes), *wilson_interval(correct, len(outcomes)), len(outcomes))


def _label(run: str) -> str:
    parts = run.split("-")
    return "-".join(parts[parts.index("recall") + 1: -3]) or "?"


def _one_n(label: str) -> str:
    """'-N6' for a run of the benchmark's N=6 cases only (--participants), else ''."""
    match = re.search(r"-N\d+$", label)
    return match.group(0) if match else ""


def _model(run: str) -> str:
    """The model a run was made with: its name up to the dtype before '-recall-'."""
    return run.split("-recall-")[0].rsplit("-", 1)[0]


def recall_models(directory: Path) -> list[str]:
    """The models with runs in `directory`, 'default' first."""
    names = {_model(json.loads(p.read_text())["run"]) for p in directory.glob("*.summary.json")}
    return sorted(names, key=lambda name: (name != "default", name))


def load_recall(directory: Path, model: str | None = None) -> dict[str, RecallRun]:
    """Runs of `model` by label (shards merged); None: the directory must hold runs of one model only."""
    runs: dict[str, RecallRun] = {}
    if model is None and len(models := recall_models(directory)) > 1:
        raise ValueError(f"{directory} holds runs of {models}: name the model (labels would collide)")
    for path in sorted(directory.glob("*.summary.json")):
        summary = json.loads(path.read_text())
        if model is not None and _model(summary["run"]) != model:
            continue
        label = _label(summary["run"])
        rows = {r["index"]: r for r in read_rows(rows_path(directory, summary["run"]))}
        if label in runs:  # another shard: weigh the means by cases
            old = runs[label]
            total = len(old.rows) + len(rows)
            old.published_bytes = (old.published_bytes * len(old.rows) + summary["mean_published_bytes"] * len(rows)) / total
            old.prefill_flops = (old.prefill_flops * len(old.rows) + summary["mean_prefill_flops"] * len(rows)) / total
            old.rows.update(rows)
        else:
            runs[label] = RecallRun(label, rows, summary["mean_published_bytes"], summary["mean_prefill_flops"])
    return runs


def figure(runs: dict[str, RecallRun], out: Path) -> Path | None:
    """Recall against N per setting, and against K/V bytes per participant."""
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for run in sorted(runs.values(), key=lambda r: -r.accuracy()[0]):
        ns = sorted({r["participants"] for r in run.rows.values()})
        stats = [run.accuracy(n) for n in ns]
        ys = [100 * a for a, *_ in stats]
        axes[0].errorbar(ns, ys, yerr=[[y - 100 * lo for y, (_, lo, _, _) in zip(ys, stats)],
                                       [100 * hi - y for y, (_, _, hi, _) in zip(ys, stats)]],
                         marker="o", capsize=3, label=run.label, alpha=0.85)
        acc, lo, hi, _ = run.accuracy()
        axes[1].errorbar([run.published_bytes / 2**10], [100 * acc], yerr=[[100 * (acc - lo)], [100 * (hi - acc)]],
                         marker="o", capsize=3, ls="none")
        axes[1].annotate(run.label, (run.published_bytes / 2**10, 100 * acc), fontsize=6, xytext=(3, 3),
                         textcoords="offset points")
    axes[0].set(xlabel="participants N", ylabel="recall (%)", title="recall by N (95% Wilson intervals)")
    axes[0].legend(fontsize=6)
    axes[1].set(xlabel="K/V KiB published per participant (mean)", ylabel="recall (%)",
                title="recall against bytes (all N)")
    fig.suptitle("Cross-party recall: a fact held by one party, the question by the last")
    fig.tight_layout()
    path = out / "recall.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tables(runs: dict[str, RecallRun], title: str = "Cross-party recall") -> list[str]:
    """Markdown: every run overall and per N, then each run paired with centralised on the same cases."""
    if not runs:
        return []
    ns = sorted({r["participants"] for run in runs.values() for r in run.rows.values()})
    lines = ["", f"### {title}", "",
             "| setting | cases | recall | 95% CI | " + " | ".join(f"N={n}" for n in ns)
             + " | K/V KiB published / participant | prefill GFLOPs / participant |",
             "|---|---:|---:|---|" + "---:|" * len(ns) + "---:|---:|"]
    for run in sorted(runs.values(), key=lambda r: -r.accuracy()[0]):
        acc, lo, hi, cases = run.accuracy()
        per_n = " | ".join(f"{100 * run.accuracy(n)[0]:.0f}%" if run.outcomes(n) else "-" for n in ns)
        lines.append(f"| {run.label} | {cases} | {100 * acc:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% | {per_n} "
                     f"| {run.published_bytes / 2**10:.0f} | {run.prefill_flops / 1e9:.1f} |")
    if any(label.startswith("centralised") for label in runs):
        lines += ["", "Paired with centralised on the same cases (runs of one N with centralised on that N; "
                  "McNemar exact, two-sided, uncorrected):", "",
                  "| setting | cases | only centralised right | only setting right | p |", "|---|---:|---:|---:|---:|"]
        for run in sorted(runs.values(), key=lambda r: r.label):
            central = runs.get("centralised" + _one_n(run.label))
            if central is None or run is central:
                continue
            a, b = central.outcomes(), run.outcomes()
            common = a.keys() & b.keys()
            only_a = sum(a[i] and not b[i] for i in common)
            only_b = sum(b[i] and not a[i] for i in common)
            lines.append(f"| {run.label} | {len(common)} | {only_a} | {only_b} | {mcnemar_exact(only_a, only_b):.2g} |")
    return lines
