"""Figures and tables for RESULTS.md from saved results: `python -m fedattn_vllm.eval plots`.

Reads `<results>/gsm8k/*.summary.json` (+ their `.jsonl.gz`; shards of one config made with
--offset are merged), `<results>/recall/*.summary.json` (likewise, `recall_report`),
`<results>/fidelity/<sweep>.json` and `<results>/attention/<sweep>.json`;
writes PNGs and `tables.md`.
A figure whose runs are missing is skipped, so a partial sweep still plots.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedattn_vllm.eval import recall_report  # noqa: E402
from fedattn_vllm.eval.records import read_rows, rows_path  # noqa: E402
from fedattn_vllm.eval.stats import mcnemar_exact, wilson_interval  # noqa: E402

SPLITS = ("TokAg", "SemAg", "TokEx", "SemEx")
PLACEMENTS = ("uniform", "front_half", "back_half", "increasing", "decreasing")
# fidelity sweeps drawn as curves over their numeric parameter -> x axis label
FIDELITY_CURVES = {"interval": "sync interval H (N=4, TokEx)", "participants": "participants N (H=4, TokEx)",
                   "participants_tokag": "participants N (H=4, TokAg)"}


@dataclass(frozen=True)
class Setting:
    """What an accuracy run measured (everything but which problems)."""

    participants: int
    interval: int
    placement: str
    split: str
    shots: int
    ratio: float
    selection: str
    publisher_interval: int | None
    publisher_dense: bool = False
    generator_interval: int | None = None
    wire: str = "native"  # kv_wire
    local_ratio: float = 1.0  # local_keep_ratio (sparse local computation; its tokens chosen by `selection`)

    @property
    def label(self) -> str:
        if self.participants == 1:
            return "question alone, 0-shot" if self.shots == 0 else f"centralised, {self.shots}-shot"
        text = f"N={self.participants} H={self.interval} {self.split} {self.placement} {self.shots}-shot"
        if self.ratio < 1:
            text += f" r={self.ratio:g} {self.selection}" + (" publisher r=1" if self.publisher_dense else "")
        text += f" Hp={self.publisher_interval}" if self.publisher_interval else ""
        text += f" Hg={self.generator_interval}" if self.generator_interval else ""
        text += f" local r={self.local_ratio:g} {self.selection}" if self.local_ratio < 1 else ""
        return text + (f" {self.wire}" if self.wire != "native" else "")


@dataclass
class Accuracy:
    setting: Setting
    outcomes: dict[int, bool]  # test-set index -> answered correctly
    published_bytes: float  # mean over problems and participants
    prefill_flops: float  # mean over problems and participants

    @property
    def problems(self) -> int:
        return len(self.outcomes)

    @property
    def correct(self) -> int:
        return sum(self.outcomes.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.problems

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.problems)


def _setting(args: dict) -> Setting:
    n, local = args["participants"], args.get("local_keep_ratio", 1.0)
    return Setting(n, args["sync_interval"] if n > 1 else 1, args["placement"] if n > 1 else "uniform",
                   args["split"] if n > 1 else "-", args["shots"], args["kv_share_ratio"],
                   args["kv_selection"] if args["kv_share_ratio"] < 1 or local < 1 else "-",
                   args.get("publisher_sync_interval"), args.get("publisher_dense", False) and args["kv_share_ratio"] < 1,
                   args.get("generator_sync_interval") if n > 1 else None, args.get("kv_wire", "native"), local)


def load_accuracy(directory: Path) -> dict[Setting, Accuracy]:
    """Accuracy runs by setting; shards of one setting are merged (each problem counted once)."""
    rows: dict[Setting, dict[int, dict]] = {}
    flops: dict[Setting, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("*.summary.json")):
        summary = json.loads(path.read_text())
        setting = _setting(summary["args"])
        for row in read_rows(rows_path(directory, summary["run"])):
            rows.setdefault(setting, {})[row["index"]] = row
        flops.setdefault(setting, []).append((summary["problems"], statistics.mean(summary["mean_prefill_flops"])))
    merged = {}
    for setting, by_index in rows.items():
        shards = flops[setting]
        merged[setting] = Accuracy(
            setting, {i: bool(r["correct"]) for i, r in by_index.items()},
            # a sole participant's "published" K/V reach nobody: centralised inference exchanges nothing
            0.0 if setting.participants == 1 else
            statistics.mean(statistics.mean(r["published_bytes"]) for r in by_index.values()),
            sum(n * f for n, f in shards) / sum(n for n, _ in shards),
        )
    return merged


def load_sweeps(directory: Path) -> dict[str, dict]:
    """Fidelity or attention sweeps by name (<directory>/<sweep>.json); none if the directory is missing."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def _errorbar(ax, points: list[Accuracy], xs, **style) -> None:
    ys = [100 * p.accuracy for p in points]
    low = [y - 100 * p.ci95[0] for y, p in zip(ys, points)]
    high = [100 * p.ci95[1] - y for y, p in zip(ys, points)]
    ax.errorbar(xs, ys, yerr=[low, high], capsize=3, **{"marker": "o", **style})


def _baseline(ax, runs: dict[Setting, Accuracy], shots: int) -> None:
    """The centralised run with `shots` shots as a band (95% CI), and the question holder alone."""
    base = next((a for s, a in runs.items() if s.participants == 1 and s.shots == shots), None)
    if base is not None:
        ax.axhline(100 * base.accuracy, color="black", lw=1, label=f"centralised ({base.problems} problems)")
        ax.axhspan(100 * base.ci95[0], 100 * base.ci95[1], color="black", alpha=0.08)
    _alone(ax, runs)


def _alone(ax, runs: dict[Setting, Accuracy]) -> None:
    """The question alone (0-shot, centralised): what the TokEx question holder gets without any sync."""
    alone = next((a for s, a in runs.items() if s.participants == 1 and s.shots == 0), None)
    if alone is not None:
        ax.axhline(100 * alone.accuracy, color="tab:gray", lw=1, ls="--",
                   label=f"question alone, no exemplars ({alone.problems} problems)")


def _dense(s: Setting, shots: int = 4) -> bool:
    return (s.participants > 1 and s.shots == shots and s.ratio == 1 and not s.publisher_interval
            and not s.generator_interval and s.wire == "native")


def _save(fig, out: Path, name: str) -> Path:
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_vs_interval(runs, out: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for split in SPLITS:
        points = sorted((a for s, a in runs.items() if _dense(s) and s.participants == 4 and s.split == split
                         and s.placement == "uniform"), key=lambda a: a.setting.interval)
        if points:
            counts = sorted({p.problems for p in points})
            problems = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
            _errorbar(ax, points, [p.setting.interval for p in points], label=f"{split} ({problems} problems per H)")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    _baseline(ax, runs, 4)
    ax.set(xscale="log", xlabel="sync interval H (log scale)", ylabel="GSM8K accuracy (%)",
           title="Accuracy vs H (N=4, 4-shot)")
    ax.set_xticks([1, 2, 3, 4, 6, 8, 12, 24], labels=["1", "2", "3", "4", "6", "8", "12", "24"])
    ax.legend(fontsize=8)
    return _save(fig, out, "accuracy_vs_interval.png")


def accuracy_vs_participants(runs, out: Path) -> Path | None:
    points = sorted((a for s, a in runs.items() if s.shots == 8 and s.ratio == 1 and s.split in ("TokEx", "-")
                     and s.interval in (1, 4) and s.placement == "uniform"), key=lambda a: a.setting.participants)
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    _errorbar(ax, points, [p.setting.participants for p in points], label="TokEx, H=4")
    _alone(ax, runs)
    ax.set(xlabel="participants N (N=1: centralised)", ylabel="GSM8K accuracy (%)", title="Accuracy vs N (H=4, 8-shot)")
    ax.legend(fontsize=8)
    return _save(fig, out, "accuracy_vs_participants.png")


def placement(runs, fidelity: dict, out: Path) -> Path | None:
    points = [next((a for s, a in runs.items() if _dense(s) and s.participants == 4 and s.interval == 4
                    and s.split == "TokEx" and s.placement == p), None) for p in PLACEMENTS]
    fid = fidelity.get("placement")
    if not any(points) and fid is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    present = [(p, a) for p, a in zip(PLACEMENTS, points) if a is not None]
    if present:
        _errorbar(axes[0], [a for _, a in present], [p for p, _ in present], ls="none")
        _baseline(axes[0], runs, 4)
        axes[0].legend(fontsize=8)
    axes[0].set(ylabel="GSM8K accuracy (%)", title="Accuracy by sync placement (N=4, 6 sync layers)")
    if fid is not None:
        _fidelity_bars(axes[1], fid["variants"])
        axes[1].set_title(f"Next-token agreement with centralised ({fid['problems']} problems)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    return _save(fig, out, "placement.png")


def _fidelity_bars(ax, variants: list[dict]) -> None:
    labels = [v["label"] for v in variants]
    ax.bar(labels, [v["agreement"] for v in variants], yerr=[v["agreement_sem"] for v in variants], capsize=3)
    ax.set(ylabel="next-token agreement", ylim=(0, 1))


def _no_sync_variant(fidelity: dict) -> dict | None:
    """The fidelity of the generator alone (explicit placement, no sync layers), from any sweep that has it."""
    return next((v for sweep in fidelity.values() for v in sweep["variants"]
                 if v["config"].get("placement") == "explicit" and not v["config"].get("sync_layers")), None)


def sparse(runs, fidelity: dict, out: Path) -> Path | None:
    fid = fidelity.get("sparse")
    accs = {sel: sorted((a for s, a in runs.items() if s.participants == 4 and s.interval == 4 and s.shots == 4
                         and s.split == "TokEx" and s.placement == "uniform" and s.ratio < 1 and s.selection == sel and not s.publisher_dense),
                        key=lambda a: a.setting.ratio) for sel in ("random", "key_norm")}
    if fid is None and not any(accs.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if fid is not None:
        for sel, marker in (("random", "o"), ("key_norm", "s")):
            rows = [v for v in fid["variants"] if v["config"]["kv_selection"] == sel]
            axes[0].errorbar([sum(v["mean_published_bytes"]) / len(v["mean_published_bytes"]) / 2**10 for v in rows],
                             [v["agreement"] for v in rows], yerr=[v["agreement_sem"] for v in rows],
                             marker=marker, capsize=3, label=sel)
        alone = _no_sync_variant(fidelity)
        if alone is not None:
            axes[0].axhline(alone["agreement"], color="tab:gray", lw=1, ls="--", label="no sync (generator alone)")
        axes[0].set(xlabel="K/V KiB published per participant (mean)", ylabel="next-token agreement",
                    title=f"Sparse sharing: fidelity at equal bytes ({fid['problems']} problems)")
        axes[0].legend(fontsize=8)
    dense = next((a for s, a in runs.items() if _dense(s) and s.participants == 4 and s.interval == 4
                  and s.split == "TokEx" and s.placement == "uniform"), None)
    for sel, marker in (("random", "o"), ("key_norm", "s")):
        points = accs[sel] + ([dense] if dense and accs[sel] else [])
        if points:
            _errorbar(axes[1], points, [p.setting.ratio for p in points], label=sel, marker=marker)
    _baseline(axes[1], runs, 4)
    axes[1].set(xlabel="share ratio r", ylabel="GSM8K accuracy (%)", title="Sparse sharing: accuracy (N=4, H=4)")
    axes[1].legend(fontsize=8)
    return _save(fig, out, "sparse.png")


def _frontier_family(s: Setting) -> str:
    """The legend entry a frontier point belongs to."""
    if s.participants == 1:
        return "centralised"
    if s.generator_interval:
        wire = f", {s.wire}" if s.wire != "native" else ""
        return f"generator reads every {s.generator_interval} layer(s), H={s.interval}{wire}"
    if s.ratio < 1:
        publisher = ", publisher r=1" if s.publisher_dense else ""
        return f"sparse ({s.selection.replace('_', ' ')}), H={s.interval}{publisher}"
    if s.placement == "uniform":
        return "dense, uniform sync (every split)"
    return f"dense, other placements (H={s.interval})"


def _frontier_tag(s: Setting) -> str:
    """What tells a point apart inside its family: H (dense; bytes fall as 1/H), r (sparse) or the placement."""
    if s.participants == 1:
        return "N=1"
    if s.ratio < 1:
        return f"r={s.ratio:g}"
    return f"H={s.interval}" if s.placement == "uniform" else s.placement


def frontier(runs, out: Path) -> Path | None:
    points = [a for s, a in runs.items() if s.shots == 4 and (s.participants in (1, 4))]
    if len(points) < 2:
        return None
    families: dict[str, list[Accuracy]] = {}
    for p in sorted(points, key=lambda a: a.setting.label):
        families.setdefault(_frontier_family(p.setting), []).append(p)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, attr, scale, label in ((axes[0], "published_bytes", 2**20, "K/V MiB published per participant (mean)"),
                                   (axes[1], "prefill_flops", 1e12, "prefill TFLOPs per participant (mean, modelled)")):
        for family, members in families.items():
            _errorbar(ax, members, [getattr(p, attr) / scale for p in members], ls="none", label=family, alpha=0.8)
        _alone(ax, runs)
        ax.set(xlabel=label, ylabel="GSM8K accuracy (%)")
    best: dict[tuple[str, str], Accuracy] = {}  # each tag once per family, on its best point (dense H: a column)
    for family, members in families.items():
        for p in members:
            key = (family, _frontier_tag(p.setting))
            if key not in best or p.accuracy > best[key].accuracy:
                best[key] = p
    tags: dict[tuple[float, float], list[str]] = {}  # coinciding points share one label
    for (_, tag), p in best.items():
        tags.setdefault((round(p.published_bytes / 2**20, 3), round(100 * p.accuracy, 1)), []).append(tag)
    for xy, names in tags.items():
        axes[0].annotate(", ".join(names), xy, fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes[1].legend(fontsize=7, loc="center right")
    fig.suptitle("Accuracy against communication and computation (4-shot; N=4 unless N=1)")
    return _save(fig, out, "frontier.png")


def _per_sweep(fidelity: dict, out: Path, name: str, draw) -> Path | None:
    """One panel per fidelity sweep over a numeric parameter, each drawn by draw(ax, sweep); None if none."""
    sweeps = [fidelity[s] for s in FIDELITY_CURVES if s in fidelity]
    if not sweeps:
        return None
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        draw(ax, sweep)
    return _save(fig, out, name)


def fidelity_layers(fidelity: dict, out: Path) -> Path | None:
    def draw(ax, sweep):
        for v in sweep["variants"]:
            ax.plot(range(len(v["layer_deviation"])), v["layer_deviation"], label=v["label"])
        ax.set(xlabel="hidden state (0: embeddings, l: after layer l)",
               ylabel="relative deviation from centralised",
               title=f"Error propagation, {sweep['sweep']} sweep ({sweep['problems']} problems)")
        ax.legend(fontsize=7, ncol=2)
    return _per_sweep(fidelity, out, "fidelity_layers.png", draw)


def fidelity_summary(fidelity: dict, out: Path) -> Path | None:
    def draw(ax, sweep):
        rows = sweep["variants"]
        x = [int(v["label"].split("=")[1]) for v in rows]
        ax.errorbar(x, [v["agreement"] for v in rows], yerr=[v["agreement_sem"] for v in rows],
                    marker="o", capsize=3, label="next-token agreement")
        twin = ax.twinx()
        twin.errorbar(x, [v["kl"] for v in rows], yerr=[v["kl_sem"] for v in rows], marker="s", capsize=3,
                      color="tab:red", label="KL (nats)")
        twin.set_ylabel("KL(centralised || FedAttn), nats", color="tab:red")
        ax.set(xlabel=FIDELITY_CURVES[sweep["sweep"]],
               ylabel="next-token agreement", ylim=(0, 1.05), title=f"Fidelity vs {sweep['sweep']}")
    return _per_sweep(fidelity, out, "fidelity_summary.png", draw)


def attention(sweeps: dict, out: Path) -> Path | None:
    """Per attention sweep, a row of panels: where the generator's attention goes at each layer."""
    if not sweeps:
        return None
    titles = {"foreign": "on other participants' tokens", "foreign_first": "on their first tokens",
              "own_first": "on its own first token"}
    fig, axes = plt.subplots(len(sweeps), len(titles), figsize=(15, 4 * len(sweeps)), squeeze=False)
    for row, sweep in zip(axes, sweeps.values()):
        for ax, (measure, title) in zip(row, titles.items()):
            for v in sweep["variants"]:
                ax.plot(v[measure], marker=".", label=v["label"])
            ax.set(xlabel="layer", ylabel="attention probability (mean)", ylim=(0, 1),
                   title=f"{sweep['sweep']}: {title}, {sweep['problems']} problems")
        row[0].legend(fontsize=7)
    fig.suptitle("Where the generator's attention goes (mean over heads and its prompt tokens)")
    return _save(fig, out, "attention.png")


def _paired_table(title: str, pairs: list[tuple[Accuracy, Accuracy]]) -> list[str]:
    """(setting, reference) pairs compared on the problems both scored, with McNemar's exact test (uncorrected)."""
    lines = [f"### {title}", "", "| setting | problems in common | accuracy | reference | only setting right "
             "| only reference right | McNemar p |", "|---|---:|---:|---:|---:|---:|---:|"]
    for a, ref in sorted(pairs, key=lambda pair: pair[0].setting.label):
        common = a.outcomes.keys() & ref.outcomes.keys()
        if not common:
            continue
        ours, theirs = [a.outcomes[i] for i in common], [ref.outcomes[i] for i in common]
        only_ours = sum(x and not y for x, y in zip(ours, theirs))
        only_theirs = sum(y and not x for x, y in zip(ours, theirs))
        lines.append(f"| {a.setting.label} | {len(common)} | {100 * sum(ours) / len(common):.1f}% "
                     f"| {100 * sum(theirs) / len(common):.1f}% | {only_ours} | {only_theirs} "
                     f"| {mcnemar_exact(only_ours, only_theirs):.2g} |")
    return lines


def paired_tables(runs: dict[Setting, Accuracy]) -> list[str]:
    """FedAttn against centralised inference (same shots) and against the question alone, and key-norm against
    random selection at equal bytes, each on the problems both runs scored."""
    centralised = {s.shots: a for s, a in runs.items() if s.participants == 1}
    federated = [a for s, a in runs.items() if s.participants > 1]
    comparisons = {
        "Paired against centralised inference (same shots)":
            [(a, centralised[a.setting.shots]) for a in federated if a.setting.shots in centralised],
        "Paired against the question alone (0-shot)": [(a, centralised[0]) for a in federated if 0 in centralised],
        "Key-norm against random selection (equal bytes)":
            [(a, runs[replace(s, selection="random")]) for s, a in runs.items()
             if s.selection == "key_norm" and replace(s, selection="random") in runs],
    }
    lines = []
    for title, pairs in comparisons.items():
        lines += ["", *_paired_table(title, pairs)]
    return lines


def tables(runs: dict[Setting, Accuracy], fidelity: dict) -> str:
    """Markdown tables of every accuracy run, the paired comparisons, and every fidelity variant."""
    lines = ["### GSM8K accuracy", "",
             "| setting | problems | accuracy | 95% CI | K/V KiB published / participant | prefill GFLOPs / participant |",
             "|---|---:|---:|---|---:|---:|"]
    order = sorted(runs.values(), key=lambda a: (a.setting.shots, a.setting.participants != 1, a.setting.label))
    for a in order:
        low, high = a.ci95
        lines.append(f"| {a.setting.label} | {a.problems} | {100 * a.accuracy:.1f}% | {100 * low:.1f}-{100 * high:.1f}% "
                     f"| {a.published_bytes / 2**10:.0f} | {a.prefill_flops / 1e9:.0f} |")
    lines += paired_tables(runs)
    for name, sweep in fidelity.items():
        lines += ["", f"### Fidelity: {name} ({sweep['problems']} problems, {sweep['shots']}-shot, {sweep['dtype']})", "",
                  "| variant | next-token agreement | KL (nats) | answer NLL change (nats) | last-layer deviation "
                  "| K/V KiB published / participant |", "|---|---:|---:|---:|---:|---:|"]
        for v in sweep["variants"]:
            kib = sum(v["mean_published_bytes"]) / len(v["mean_published_bytes"]) / 2**10
            lines.append(f"| {v['label']} | {v['agreement']:.3f} ± {v['agreement_sem']:.3f} | {v['kl']:.3f} ± "
                         f"{v['kl_sem']:.3f} | {v['nll_change']:+.3f} | {v['layer_deviation'][-1]:.3f} | {kib:.0f} |")
    return "\n".join(lines) + "\n"


def run(args) -> list[Path]:
    """Every figure and tables.md from args.results into args.out (default <results>/figures)."""
    out = args.out or args.results / "figures"
    out.mkdir(parents=True, exist_ok=True)
    runs = load_accuracy(args.results / "gsm8k")
    fidelity = load_sweeps(args.results / "fidelity")
    made = [accuracy_vs_interval(runs, out), accuracy_vs_participants(runs, out), placement(runs, fidelity, out),
            sparse(runs, fidelity, out), frontier(runs, out), fidelity_layers(fidelity, out),
            fidelity_summary(fidelity, out), attention(load_sweeps(args.results / "attention"), out)]
    recall_dir, recall_lines = args.results / "recall", []
    for i, model in enumerate(recall_report.recall_models(recall_dir) if recall_dir.is_dir() else []):
        recall = recall_report.load_recall(recall_dir, model)
        if i == 0:  # the figure: the main model's runs ('default' where it has any)
            made.append(recall_report.figure(recall, out))
        recall_lines += recall_report.tables(recall, "Cross-party recall" + (f", {model}" if i else ""))
    (out / "tables.md").write_text(tables(runs, fidelity) + "".join(f"{line}\n" for line in recall_lines))
    made = [p for p in made if p is not None] + [out / "tables.md"]
    for path in made:
        print(path)
    return made
