"""Decode speed against context length: FedAttn vs. plain vLLM on the same prompts, side by side in one process.

    .venv/bin/python benchmarks/context.py --context 1024 4096 8192 --max-tokens 32 --rounds 2

For each context length, one prompt of that many tokens (seeded random token ids: speed does not
depend on the text) split evenly among N participants, generated greedily to --max-tokens:
  plain      stock vLLM on the whole prompt;
  H=1        FedAttn, every layer synced with exact K/V (the same answer as plain: its ratio is
             the extension's overhead);
  default    the server's default (fedattn_vllm.config.RECOMMENDED: every layer synced, K/V
             encoded 4-bit keys / 2-bit values even in one process);
  paper H=4  the paper's default.
Each run is timed step by step: time to first token (the prefill) and decode speed, one token a
step after the first: tokens/s is the inverse of the median step over every round's steps (a
stray slow step, which moves a short run's total by 10% here, moves the median by nothing).
Modes interleave round by round; medians.
Writes benchmarks/results/context.json.
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

from fedattn_vllm.config import RECOMMENDED, FedAttnConfig
from fedattn_vllm.driver import SessionDriver
from fedattn_vllm.engine import FederatedLLM
from fedattn_vllm.models import resolve_model
from fedattn_vllm.session import FedAttnSession

CONFIGS = {"H=1": FedAttnConfig(sync_interval=1), "default": RECOMMENDED, "paper H=4": FedAttnConfig(sync_interval=4)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 8192], help="prompt tokens")
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/context.json"))
    return parser.parse_args()


def timed_plain(llm, prompt: list[int], params) -> tuple[float, list[float]]:
    """(seconds to the first token, seconds of each step after it) of one request, stepped by hand."""
    engine = llm.llm_engine
    return _stepped(lambda: engine.add_request("plain", {"prompt_token_ids": prompt}, params),
                    engine.has_unfinished_requests,
                    lambda: any(o.outputs and o.outputs[0].token_ids for o in engine.step()))


def timed_fedattn(federated: FederatedLLM, segments: list[list[int]], config: FedAttnConfig,
                  params) -> tuple[float, list[float]]:
    """(seconds to the generator's first token, seconds of each step after it) of one session."""
    driver = SessionDriver(federated)

    def step() -> bool:
        progress = driver.advance()
        for _, result in progress.finished:
            if result.error is not None:
                raise RuntimeError(result.error)
        return bool(progress.pieces)

    return _stepped(lambda: driver.submit(*federated.prepare(FedAttnSession(segments, config, params))),
                    lambda: driver.holding, step)


def _stepped(submit, busy, step) -> tuple[float, list[float]]:
    """`submit()` the request, then run `step()` (whether it produced a token) while `busy()`: (seconds from the
    submission to the first token, each later step's seconds)."""
    started = time.perf_counter()
    submit()
    first, steps = None, []
    while busy():
        begun = time.perf_counter()
        produced = step()
        if first is not None:
            steps.append(time.perf_counter() - begun)
        elif produced:
            first = time.perf_counter() - started
    return first, steps


def main() -> None:
    args = parse_args()
    from vllm import LLM, SamplingParams

    path = resolve_model(args.model)
    longest = max(args.context) + args.max_tokens + 16
    engine_args = {"dtype": args.dtype, "max_model_len": longest, "max_num_batched_tokens": longest, "seed": 0,
                   "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}
    federated = FederatedLLM(args.model, **engine_args)
    plain = LLM(model=str(path), enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
                **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    vocab = federated.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(0, vocab, (n,), generator=generator).tolist() for n in args.context}
    runs = {"plain": lambda p: timed_plain(plain, p, params)}
    for name, config in CONFIGS.items():
        runs[name] = lambda p, config=config: timed_fedattn(federated, split(p, args.participants), config, params)
    for run in runs.values():  # warm-up on the shortest context
        run(prompts[min(args.context)])
    samples = {n: {mode: [] for mode in runs} for n in args.context}
    for round_index in range(args.rounds):
        for n, prompt in prompts.items():
            for mode, run in runs.items():
                samples[n][mode].append(run(prompt))
            print(f"round {round_index + 1}, {n} tokens: " + ", ".join(
                f"{mode} {s[-1][0]:.2f} + {sum(s[-1][1]):.2f} s" for mode, s in samples[n].items()), flush=True)
    report = {"model": args.model, "dtype": args.dtype, "participants": args.participants,
              "max_tokens": args.max_tokens, "rounds": args.rounds,
              "machine": f"{platform.machine()} {os.cpu_count()} cpus", "context": {}}
    print(f"median of {args.rounds} rounds, N={args.participants}, {args.dtype}: time to first token, decode tokens/s "
          "(ratio to plain)")
    for n, modes in samples.items():
        rows = {}
        for mode, pairs in modes.items():
            step = statistics.median(s for _, steps in pairs for s in steps)
            rows[mode] = {"ttft_s": statistics.median(ttft for ttft, _ in pairs),
                          "decode_s": statistics.median(sum(steps) for _, steps in pairs),
                          "median_step_s": step, "decode_tokens_per_s": 1 / step,
                          "samples": [{"ttft_s": ttft, "step_s": steps} for ttft, steps in pairs]}
        for row in rows.values():
            row["decode_ratio_to_plain"] = row["decode_tokens_per_s"] / rows["plain"]["decode_tokens_per_s"]
            row["ttft_ratio_to_plain"] = row["ttft_s"] / rows["plain"]["ttft_s"]
        report["context"][str(n)] = rows
        print(f"  {n:>6} tokens: " + "; ".join(
            f"{mode} {r['ttft_s']:.2f} s, {r['decode_tokens_per_s']:.1f} tok/s (x{r['decode_ratio_to_plain']:.2f})"
            for mode, r in rows.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def split(prompt: list[int], parts: int) -> list[list[int]]:
    """The prompt in `parts` contiguous segments of (nearly) equal length."""
    bounds = [round(i * len(prompt) / parts) for i in range(parts + 1)]
    return [prompt[a:b] for a, b in zip(bounds, bounds[1:])]


if __name__ == "__main__":
    main()
