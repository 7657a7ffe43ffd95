"""Colocated FedAttn vs. plain vLLM, side by side in one process on the same GSM8K prompts.

    .venv/bin/python benchmarks/colocated.py --problems 8 --shots 2 --max-tokens 32 --rounds 3

Modes, interleaved round by round so machine noise hits them alike (each round starts one mode
later, so every mode runs in every position of a round in turn):
  plain    stock vLLM (the model's own architecture) on each concatenated prompt;
  fedattn  N participants (TokEx split), for each --sync-interval given (H = 1 computes the
           same answer as plain, so its ratio is the extension's overhead), and for each H > 1
           once more with each --generator-sync-interval (the generator also reads every H_g layers);
           and the server's default (fedattn_vllm.config.RECOMMENDED: its K/V are encoded as on a
           wire even in one process, so the codec's cost shows).
Prints median throughput and ratios to plain (of the medians, and the median of each round's
plain / mode ratio with its range: a drift over the run cancels within a round), per-participant
bytes (measured at the exchange) against the analytic cost model, and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from fedattn_vllm import gsm8k
from fedattn_vllm.config import RECOMMENDED, FedAttnConfig
from fedattn_vllm.cost import ModelShape, participant_costs
from fedattn_vllm.engine import FederatedLLM
from fedattn_vllm.session import FedAttnSession
from fedattn_vllm.models import resolve_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--problems", type=int, default=8, help="GSM8K test problems (one session each)")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--sync-interval", type=int, nargs="+", default=[1, 4], help="H values to run")
    parser.add_argument("--generator-sync-interval", type=int, nargs="*", default=[1],
                        help="H_g values to run beside each H > 1")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/colocated.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from vllm import LLM, SamplingParams

    path = resolve_model(args.model)
    engine_args = {"dtype": args.dtype, "max_model_len": 4096, "max_num_batched_tokens": 8192, "seed": 0,
                   "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}
    federated = FederatedLLM(args.model, **engine_args)
    plain = LLM(model=str(path), enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
                **engine_args)
    problems = gsm8k.problems()[: args.problems]
    prompts = [gsm8k.segments(federated.tokenizer, p, args.shots, args.participants, "TokEx") for p in problems]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    configs = {f"fedattn N={args.participants} H={h}": FedAttnConfig(sync_interval=h) for h in args.sync_interval}
    configs |= {f"fedattn N={args.participants} H={h} Hg={hg}": FedAttnConfig(sync_interval=h, generator_sync_interval=hg)
                for h in args.sync_interval if h > 1 for hg in args.generator_sync_interval}
    configs[f"fedattn N={args.participants} the server's default"] = RECOMMENDED  # k4v2: encoded even in-process
    prompt_tokens = sum(len(seg) for segments in prompts for seg in segments)

    def run_plain():
        plain.generate([{"prompt_token_ids": [t for seg in s for t in seg]} for s in prompts], params, use_tqdm=False)

    def run_fedattn(config):
        return federated.generate([FedAttnSession(s, config, params) for s in prompts])

    started = time.perf_counter()
    run_plain()  # warm-up both engines
    run_fedattn(next(iter(configs.values())))
    print(f"warm-up {time.perf_counter() - started:.1f} s", flush=True)
    seconds: dict[str, list[float]] = {"plain": [], **{name: [] for name in configs}}
    last_results = {}
    modes = list(seconds)
    for round_index in range(args.rounds):
        first = round_index % len(modes)
        for name in modes[first:] + modes[:first]:
            start = time.perf_counter()
            if name == "plain":
                run_plain()
            else:
                last_results[name] = run_fedattn(configs[name])
            seconds[name].append(time.perf_counter() - start)
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {runs[-1]:.2f} s" for name, runs in seconds.items()),
              flush=True)

    output_tokens = len(prompts) * args.max_tokens
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(path), getattr(torch, args.dtype))
    report = {"model": args.model, "dtype": args.dtype, "sessions": len(prompts), "shots": args.shots,
              "participants": args.participants, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
              "rounds": args.rounds, "machine": f"{platform.machine()} {os.cpu_count()} cpus", "modes": {}}
    plain_median = statistics.median(seconds["plain"])
    print(f"{len(prompts)} sessions, {prompt_tokens} prompt + {output_tokens} generated tokens, "
          f"median of {args.rounds} rounds:")
    for name, runs in seconds.items():
        median = statistics.median(runs)
        paired = [p / s for p, s in zip(seconds["plain"], runs)]  # each round's plain / this mode
        mode = {"seconds": runs, "median_s": median, "tokens_per_s": (prompt_tokens + output_tokens) / median,
                "output_tokens_per_s": output_tokens / median, "throughput_ratio_to_plain": plain_median / median,
                "round_ratios_to_plain": paired, "median_round_ratio_to_plain": statistics.median(paired)}
        print(f"  {name:<36} {median:7.2f} s  {mode['tokens_per_s']:8.1f} tok/s  "
              f"x{mode['throughput_ratio_to_plain']:.3f} of plain, a round's ratio x{statistics.median(paired):.3f} "
              f"(x{min(paired):.3f}-{max(paired):.3f})")
        if name in configs:
            mode["bytes"] = bytes_report(last_results[name], configs[name], prompts, shape, federated.num_layers)
        report["modes"][name] = mode
    for name, mode in report["modes"].items():
        if "bytes" in mode:
            b = mode["bytes"]
            print(f"  {name}: mean bytes per session published {b['mean_published']}, received {b['mean_received']} "
                  f"(per participant); equal to the cost model: {b['equal_to_cost_model']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def bytes_report(results, config, prompts, shape, num_layers) -> dict:
    """Measured per-participant bytes, their mean over sessions, and whether they equal the model exactly."""
    equal = True
    published, received = [], []
    for result, segments in zip(results, prompts):
        costs = participant_costs(shape, config.resolve(num_layers, len(segments)), [len(s) for s in segments])
        equal &= result.cost.published_bytes == [c.upload_bytes for c in costs]
        equal &= result.cost.received_bytes == [c.download_bytes for c in costs]
        published.append(result.cost.published_bytes)
        received.append(result.cost.received_bytes)
    return {"published": published, "received": received, "mean_published": column_means(published),
            "mean_received": column_means(received), "equal_to_cost_model": equal}


def column_means(rows: list[list[int]]) -> list[int]:
    return [round(statistics.mean(column)) for column in zip(*rows)]


if __name__ == "__main__":
    main()
