"""GSM8K accuracy of FedAttn sessions on the vLLM engine (colocated, batched): `python -m fedattn_vllm.eval gsm8k`.

Each problem's few-shot prompt (the paper's format) is split among N participants by the
chosen policy; the last participant generates greedily. Writes one JSON line per problem (gzip-compressed)
(split, output, parsed answer, correctness, bytes per participant) and a summary with the
accuracy and its 95% confidence interval, the mean bytes and the modelled FLOPs per participant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from fedattn_vllm import gsm8k
from fedattn_vllm.eval.answers import extract_answer, is_correct
from fedattn_vllm.eval.cli import engine
from fedattn_vllm.eval.records import rows_path, write_rows
from fedattn_vllm.eval.stats import wilson_interval

STOP = ["Question:", "\n\n\n"]  # the next few-shot block, or a run of blank lines


def run_name(args: argparse.Namespace) -> str:
    """The file stem: everything that decides the run's results."""
    parts = [Path(args.model).name, args.dtype, f"N{args.participants}", f"H{args.sync_interval}", args.placement,
             args.split, f"{args.shots}shot"]
    if args.kv_share_ratio < 1:
        parts.append(f"r{args.kv_share_ratio:g}-{args.kv_selection}" + ("-pd" if args.publisher_dense else ""))
    if args.publisher_sync_interval:
        parts.append(f"hp{args.publisher_sync_interval}")
    if getattr(args, "generator_sync_interval", None):
        parts.append(f"hg{args.generator_sync_interval}")
    if getattr(args, "kv_wire", "native") != "native":
        parts.append(args.kv_wire)
    if getattr(args, "local_keep_ratio", 1.0) < 1:  # the selection too where it is not the default
        parts.append(f"lk{args.local_keep_ratio:g}" + ("" if args.kv_selection == "random" else f"-{args.kv_selection}"))
    return "-".join(parts + [f"o{args.offset}", f"n{args.limit}", f"s{args.seed}"])


def share_ratio(args: argparse.Namespace) -> float | tuple[float, ...]:
    """--kv-share-ratio for everyone, or for all but the question holder (the last) with --publisher-dense."""
    if not args.publisher_dense:
        return args.kv_share_ratio
    return (args.kv_share_ratio,) * (args.participants - 1) + (1.0,)


def run(args: argparse.Namespace) -> dict:
    """One accuracy run; writes `<run>.jsonl.gz` and `<run>.summary.json` under args.out."""
    done = args.out / f"{run_name(args)}.summary.json"
    if args.resume and done.exists():
        print(f"{done} exists: skipped")
        return json.loads(done.read_text())
    from transformers import AutoConfig
    from vllm import SamplingParams

    from fedattn_vllm.config import FedAttnConfig
    from fedattn_vllm.cost import ModelShape, participant_costs
    from fedattn_vllm.session import FedAttnSession

    config = FedAttnConfig(sync_interval=args.sync_interval, placement=args.placement, seed=args.seed,
                           kv_share_ratio=share_ratio(args), kv_selection=args.kv_selection,
                           publisher_sync_interval=args.publisher_sync_interval,
                           generator_sync_interval=args.generator_sync_interval, kv_wire=args.kv_wire,
                           local_keep_ratio=args.local_keep_ratio)
    llm = engine(args)
    problems = gsm8k.problems()[args.offset: None if args.limit is None else args.offset + args.limit]
    splits = [gsm8k.segments(llm.tokenizer, p, args.shots, args.participants, args.split) for p in problems]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop=STOP)
    started = time.perf_counter()
    # One random draw per problem (seed + its test-set index): with TokEx/SemEx every problem shares its
    # exemplar segments, so one seed for all would score a single draw of the sparse selection.
    configs = [replace(config, seed=args.seed + args.offset + i) for i in range(len(problems))]
    results = llm.generate([FedAttnSession(s, c, params) for s, c in zip(splits, configs)], use_tqdm=True)
    elapsed = time.perf_counter() - started
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(llm.model_path), args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    name = run_name(args)
    rows, flops = [], []
    for i, (problem, segments, result) in enumerate(zip(problems, splits, results)):
        text = result.outputs[args.participants - 1].text if result.error is None else ""
        predicted, reference = extract_answer(text), gsm8k.reference_answer(problem)
        costs = participant_costs(shape, config.resolve(llm.num_layers, len(segments)), [len(s) for s in segments])
        flops.append([c.prefill_flops for c in costs])
        rows.append({"index": args.offset + i, "segment_tokens": [len(s) for s in segments], "output": text,
                     "predicted": predicted, "reference": reference, "correct": is_correct(predicted, reference),
                     "published_bytes": result.cost.published_bytes, "received_bytes": result.cost.received_bytes,
                     "error": result.error})
    write_rows(rows_path(args.out, name), rows)
    correct = sum(r["correct"] for r in rows)
    low, high = wilson_interval(correct, len(rows))
    summary = {
        "run": name, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)},
        "problems": len(rows), "correct": correct, "accuracy": correct / len(rows), "ci95": [low, high],
        "sync_layers": list(config.resolve(llm.num_layers, args.participants).sync_layers),
        "mean_published_bytes": [statistics.mean(r["published_bytes"][n] for r in rows) for n in range(args.participants)],
        "mean_received_bytes": [statistics.mean(r["received_bytes"][n] for r in rows) for n in range(args.participants)],
        "mean_prefill_flops": [statistics.mean(f[n] for f in flops) for n in range(args.participants)],
        "errors": sum(r["error"] is not None for r in rows), "seconds": elapsed,
    }
    (args.out / f"{name}.summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{name}: accuracy {summary['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}) on {len(rows)} problems "
          f"in {elapsed:.0f} s -> {args.out}")
    return summary

