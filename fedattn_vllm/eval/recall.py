"""Cross-party recall on the vLLM engine: `python -m fedattn_vllm.eval recall`.

Each case (`recall_cases`) puts a fact on one party's page of notes and the question about
it with the last party, which generates greedily. The parts form one chat turn; with
`--public-prefix` the chat template's head is the session's public prefix, otherwise it
opens participant 0's segment (the paper has no public prefix). `--mode centralised` runs
the whole prompt as one segment, `--mode alone` the question alone. Writes one JSON line
per case (`.jsonl.gz`) and a summary: accuracy with its 95% Wilson interval, overall, per
N and per kind, and the mean K/V bytes and prefill FLOPs per participant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from fedattn_vllm.eval.cli import engine
from fedattn_vllm.eval.records import rows_path, write_rows
from fedattn_vllm.eval.recall_cases import make_cases
from fedattn_vllm.eval.stats import wilson_interval

MODES = ("federated", "centralised", "alone")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The recall run's own arguments (beside `cli.add_run_arguments`)."""
    p.add_argument("--mode", default="federated", choices=MODES)
    p.add_argument("--sync-interval", "-H", type=int, default=4)
    p.add_argument("--placement", default="uniform")
    p.add_argument("--sync-layers", help="with --placement explicit: comma-separated layers ('' for none)")
    p.add_argument("--generator-sync-interval", type=int, help="the generator also reads every H_g layers")
    p.add_argument("--public-prefix", action="store_true", help="the chat template's head as the public prefix")
    p.add_argument("--kv-share-ratio", type=float, default=1.0)
    p.add_argument("--kv-selection", default="random")
    p.add_argument("--count", type=int, default=250, help="cases (N and kind cycle over them)")
    p.add_argument("--participants", "-N", type=int, help="only the benchmark's cases with this N (2..6)")


def config_of(args: argparse.Namespace):
    from fedattn_vllm.config import FedAttnConfig

    layers = None
    if args.placement == "explicit":
        layers = tuple(int(l) for l in (args.sync_layers or "").split(",") if l.strip())
    return FedAttnConfig(sync_interval=args.sync_interval, placement=args.placement, sync_layers=layers,
                         generator_sync_interval=args.generator_sync_interval, kv_share_ratio=args.kv_share_ratio,
                         kv_selection=args.kv_selection, kv_wire=args.kv_wire, seed=args.seed)


def run_name(args: argparse.Namespace) -> str:
    """The file stem: everything that decides the run's results."""
    parts = [Path(args.model).name, args.dtype, "recall"]
    if args.mode != "federated":
        parts.append(args.mode)
    else:
        parts += [f"H{args.sync_interval}", args.placement]
        if args.placement == "explicit":
            parts.append("L" + (args.sync_layers or "none").replace(",", "."))
        if args.generator_sync_interval:
            parts.append(f"hg{args.generator_sync_interval}")
        if args.kv_share_ratio < 1:
            parts.append(f"r{args.kv_share_ratio:g}-{args.kv_selection}")
        if args.kv_wire != "native":
            parts.append(args.kv_wire)
    if args.public_prefix:
        parts.append("pp")
    if args.participants:
        parts.append(f"N{args.participants}")
    return "-".join(parts + [f"o{args.offset}", f"n{args.count}", f"s{args.seed}"])


def session_parts(tokenizer, case, mode: str, public_prefix: bool) -> tuple[list[int], list[list[int]]]:
    """(public prefix, segments) of a case: each part tokenized alone, as its participant would."""
    from fedattn_vllm.prompting import encode_segments

    head, segments = encode_segments(tokenizer, list(case.parts), chat=True)
    if mode == "centralised":
        segments = [[t for s in segments for t in s]]
    elif mode == "alone":
        segments = segments[-1:]
    if public_prefix:
        return head, segments
    return [], [head + segments[0], *segments[1:]]


def _accuracy(rows: list[dict]) -> dict:
    correct = sum(r["correct"] for r in rows)
    return {"cases": len(rows), "correct": correct, "accuracy": correct / len(rows),
            "ci95": list(wilson_interval(correct, len(rows)))}


def run(args: argparse.Namespace) -> dict:
    """One recall run; writes `<run>.jsonl.gz` and `<run>.summary.json` under args.out."""
    name = run_name(args)
    done = args.out / f"{name}.summary.json"
    if args.resume and done.exists():
        print(f"{done} exists: skipped")
        return json.loads(done.read_text())
    from transformers import AutoConfig
    from vllm import SamplingParams

    from fedattn_vllm.cost import ModelShape, participant_costs
    from fedattn_vllm.session import FedAttnSession

    config = config_of(args)
    llm = engine(args)
    cases = make_cases(llm.tokenizer, args.count, args.seed, args.offset, args.participants)
    prompts = [session_parts(llm.tokenizer, c, args.mode, args.public_prefix) for c in cases]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    # One random draw per case (seed + its index), as in the GSM8K runs.
    configs = [replace(config, seed=args.seed + c.index) for c in cases]
    started = time.perf_counter()
    results = llm.generate([FedAttnSession(segments, c, params, public_prefix=prefix)
                            for (prefix, segments), c in zip(prompts, configs)], use_tqdm=True)
    elapsed = time.perf_counter() - started
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(llm.model_path), args.dtype)
    rows, flops = [], []
    for case, (prefix, segments), result in zip(cases, prompts, results):
        text = result.outputs[len(segments) - 1].text if result.error is None else ""
        lengths = [len(s) for s in segments]
        costs = participant_costs(shape, config.resolve(llm.num_layers, len(segments)), lengths, len(prefix))
        flops.append(statistics.mean(c.prefill_flops for c in costs))
        rows.append({"index": case.index, "kind": case.kind, "participants": case.participants, "holder": case.holder,
                     "prefix_tokens": len(prefix), "segment_tokens": lengths, "output": text,
                     "answer": case.fact.answer, "correct": case.correct(text),
                     "published_bytes": result.cost.published_bytes, "received_bytes": result.cost.received_bytes,
                     "error": result.error})
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows(rows_path(args.out, name), rows)
    summary = {
        "run": name, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)},
        "config": config.to_dict(), **_accuracy(rows),
        "by_participants": {n: _accuracy([r for r in rows if r["participants"] == n])
                            for n in sorted({r["participants"] for r in rows})},
        "by_kind": {k: _accuracy([r for r in rows if r["kind"] == k]) for k in sorted({r["kind"] for r in rows})},
        # per participant, averaged over cases (a sole participant's K/V reach nobody: counted as 0)
        "mean_published_bytes": statistics.mean(
            statistics.mean(r["published_bytes"]) if len(r["published_bytes"]) > 1 else 0 for r in rows),
        "mean_prefill_flops": statistics.mean(flops),
        "errors": sum(r["error"] is not None for r in rows), "seconds": elapsed,
    }
    done.write_text(json.dumps(summary, indent=2))
    low, high = summary["ci95"]
    print(f"{name}: recall {summary['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}) on {len(rows)} cases "
          f"in {elapsed:.0f} s -> {args.out}")
    return summary
