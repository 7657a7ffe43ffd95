"""Int8 K/V on the wire vs. exact K/V: bytes and fidelity, side by side on the same GSM8K prompts.

    .venv/bin/python benchmarks/kv_wire.py --problems 10 --shots 4 --participants 4 --sync-interval 4

Runs every session twice in one colocated engine (both transports carry the same encoded
K/V, so federated mode gives the same numbers): once with kv_wire="native", once with
"int8". Reports bytes exchanged, how many greedy outputs stay identical and where the
others first diverge, and the largest change of the generator's first-token log-probs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedattn_vllm import gsm8k
from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.engine import FederatedLLM, FedAttnSession


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--problems", type=int, default=10)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--sync-interval", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kv_wire.json"))
    return parser.parse_args()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    args = parse_args()
    from vllm import SamplingParams

    llm = FederatedLLM(args.model, dtype=args.dtype, max_model_len=4096, max_num_batched_tokens=16384, seed=0,
                       kv_cache_memory_bytes=1 << 30)
    prompts = [gsm8k.segments(llm.tokenizer, p, args.shots, args.participants, "TokEx")
               for p in gsm8k.problems()[: args.problems]]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=20)
    results = {}
    for wire in ("native", "int8"):
        config = FedAttnConfig(sync_interval=args.sync_interval, kv_wire=wire)
        results[wire] = llm.generate([FedAttnSession(s, config, params) for s in prompts], use_tqdm=True)
    g = args.participants - 1
    divergences, largest = [], 0.0
    for exact, int8 in zip(results["native"], results["int8"]):
        divergences.append(first_divergence(exact.outputs[g].token_ids, int8.outputs[g].token_ids))
        a, b = exact.outputs[g].logprobs[0], int8.outputs[g].logprobs[0]
        largest = max(largest, *(abs(a[t].logprob - b[t].logprob) for t in a.keys() & b.keys()))
    exchanged = {wire: statistics.mean(sum(r.cost.published_bytes) + sum(r.cost.received_bytes) for r in rs)
                 for wire, rs in results.items()}
    identical = sum(d is None for d in divergences)
    print(f"\n{args.problems} GSM8K prompts, {args.shots}-shot TokEx, N={args.participants}, H={args.sync_interval}, "
          f"{args.dtype}, {args.max_tokens} greedy tokens")
    print(f"bytes exchanged per session (mean): native {exchanged['native']:,.0f}, int8 {exchanged['int8']:,.0f} "
          f"({exchanged['native'] / exchanged['int8']:.2f}x fewer)")
    print(f"identical outputs: {identical}/{args.problems}; first divergence of the others at token "
          f"{sorted(d for d in divergences if d is not None)}")
    print(f"largest first-token log-prob change (vLLM's top 20): {largest:.3e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args), "bytes_per_session": exchanged, "identical": identical,
                                    "first_divergence": divergences, "largest_first_logprob_change": largest},
                                   indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
