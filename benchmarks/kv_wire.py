"""K/V on the wire, every encoding side by side: bytes, fidelity against exact K/V, and codec cost per layer.

    .venv/bin/python benchmarks/kv_wire.py codec --tokens 100 400 --participants 4
    .venv/bin/python benchmarks/kv_wire.py fidelity --problems 10 --shots 4 --participants 4 -H 2 \\
        --generator-sync-interval 1

codec: per sync layer, on the model's shape and dtype (random K/V: the cost does not depend on
    values), the generator's attention over every other participant's tokens and its own (causal)
    as the engine computes it (on the CPU vLLM's kernel over keys copied into its paged layout,
    the copy included) beside each encoding's encode (one publish) and checked decode (one fetch
    per other participant), with the time its bytes take on a 1 Gbit/s link. The int8 and low-bit codecs
    run twice, on the C kernel and on the torch reference (`kernels.native.reference_only`).
    Medians over --repeats.
fidelity: the same GSM8K sessions in one colocated engine once per encoding (both transports
    carry the same encoded K/V, so federated mode gives the same numbers): bytes per
    participant, greedy outputs identical to exact K/V, the first token's agreement, where the
    others first diverge, and the largest change of the generator's first-token log-probs.
Both write machine-readable results to benchmarks/results/kv_wire_<part>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
from pathlib import Path

import torch
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from fedattn_vllm.config import FedAttnConfig, KVWire
from fedattn_vllm.cost import ModelShape
from fedattn_vllm.kv_wire import CODECS, decode_checked, encode_kv
from fedattn_vllm.models import resolve_model
from kernels import concat_kv, fused_partial_attention, merge_attention, native, quant_native
from kernels.paged import PagedKeys, available, paged_attention, pool_for
from timing import median_seconds

LINK_BITS_PER_S = 1e9
PAGED_BLOCK = 128  # vLLM's CPU attention block size


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["codec", "fidelity"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--participants", "-N", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs="+", default=[100, 400], help="codec: tokens per participant")
    parser.add_argument("--repeats", type=int, default=30, help="codec: timed repeats (median)")
    parser.add_argument("--problems", type=int, default=10, help="fidelity: GSM8K problems (one session each)")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--sync-interval", "-H", type=int, default=4)
    parser.add_argument("--generator-sync-interval", type=int)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/kv_wire_<part>.json")
    return parser.parse_args()


def codec(args: argparse.Namespace, shape: ModelShape, heads: int, dtype: torch.dtype) -> dict:
    """Per-layer codec and attention times of the generator, for each message size and encoding."""
    generator = torch.Generator().manual_seed(0)
    isa = _get_attn_isa(dtype, PAGED_BLOCK, shape.head_dim) if available("cpu") else None
    rows = []
    for tokens in args.tokens:
        def tensor(t: int, h: int) -> torch.Tensor:
            return torch.randn(t, h, shape.head_dim, generator=generator).to(dtype)

        query = tensor(tokens, heads)
        own = tensor(tokens, shape.num_kv_heads), tensor(tokens, shape.num_kv_heads)
        others = [(tensor(tokens, shape.num_kv_heads), tensor(tokens, shape.num_kv_heads))
                  for _ in range(args.participants - 1)]
        scale = shape.head_dim ** -0.5

        def attention() -> None:  # the engine's CPU path: one causal softmax over [foreign, own] on vLLM's kernel
            if isa is None:  # elsewhere: own (causal) and foreign K/V each by a fused kernel, merged by log-sum-exp
                merge_attention(*fused_partial_attention(query, *own, scale, causal=True),
                                *fused_partial_attention(query, *concat_kv(others), scale))
                return
            held = PagedKeys(pool_for(own[0], PAGED_BLOCK, isa))  # the copy is part of the cost
            held.append(*others, own)
            paged_attention(query, [tokens], [held], scale)

        attention_s = median_seconds(attention, args.repeats)
        size = (tokens, shape.num_kv_heads, shape.head_dim)
        for wire in KVWire:
            layer_bytes = shape.shared_layer_bytes(tokens, wire) * args.participants  # one publish + N-1 fetches
            for kernel in ("native", "reference") if wire in CODECS else ("torch",):  # side by side, one run
                with native.reference_only() if kernel == "reference" else contextlib.nullcontext():
                    payloads = [encode_kv(kv, wire) for kv in others]
                    encode_s = median_seconds(lambda: encode_kv(own, wire), args.repeats)
                    decode_s = median_seconds(lambda: decode_checked(payloads, wire, dtype, [size] * len(payloads)),
                                              args.repeats)
                rows.append({"tokens": tokens, "wire": wire.value, "codec": kernel, "attention_ms": 1e3 * attention_s,
                             "encode_ms": 1e3 * encode_s, "decode_ms": 1e3 * decode_s,
                             "codec_over_attention": (encode_s + decode_s) / attention_s,
                             "layer_bytes": layer_bytes, "link_ms": 1e3 * 8 * layer_bytes / LINK_BITS_PER_S})
    print(f"\nper sync layer, generator of N={args.participants}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; link at {LINK_BITS_PER_S / 1e9:g} Gbit/s; attention on "
          f"{'vLLM' if isa else 'torch'}'s kernel; the finite check in C: {quant_native.available()}")
    print(f"{'tokens':>6} {'wire':>6} {'codec':>9} {'attn ms':>8} {'enc ms':>7} {'dec ms':>7} {'codec/attn':>10} "
          f"{'KiB':>8} {'link ms':>8} {'codec+link ms':>13}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['wire']:>6} {r['codec']:>9} {r['attention_ms']:>8.3f} {r['encode_ms']:>7.3f} "
              f"{r['decode_ms']:>7.3f} {100 * r['codec_over_attention']:>9.1f}% {r['layer_bytes'] / 1024:>8.1f} "
              f"{r['link_ms']:>8.3f} {r['encode_ms'] + r['decode_ms'] + r['link_ms']:>13.3f}")
    return {"rows": rows, "threads": torch.get_num_threads(), "attention": "paged" if isa else "fused",
            "native_codec": quant_native.available()}


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def fidelity(args: argparse.Namespace) -> dict:
    """Every encoding against exact K/V on the same sessions in one engine."""
    from vllm import SamplingParams

    from fedattn_vllm import gsm8k
    from fedattn_vllm.engine import FederatedLLM
    from fedattn_vllm.session import FedAttnSession

    llm = FederatedLLM(args.model, dtype=args.dtype, max_model_len=4096, max_num_batched_tokens=16384, seed=0,
                       kv_cache_memory_bytes=1 << 30)
    prompts = [gsm8k.segments(llm.tokenizer, p, args.shots, args.participants, "TokEx")
               for p in gsm8k.problems()[: args.problems]]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=20)
    results = {}
    for wire in KVWire:
        config = FedAttnConfig(sync_interval=args.sync_interval, generator_sync_interval=args.generator_sync_interval,
                               kv_wire=wire)
        results[wire.value] = llm.generate([FedAttnSession(s, config, params) for s in prompts], use_tqdm=True)
    g = args.participants - 1
    summary = {}
    for wire, runs in results.items():
        divergences, agree, largest = [], 0, 0.0
        for exact, run in zip(results["native"], runs):
            a, b = exact.outputs[g], run.outputs[g]
            divergences.append(_first_divergence(a.token_ids, b.token_ids))
            agree += a.token_ids[0] == b.token_ids[0]
            common = a.logprobs[0].keys() & b.logprobs[0].keys()
            largest = max([largest, *(abs(a.logprobs[0][t].logprob - b.logprobs[0][t].logprob) for t in common)])
        summary[wire] = {
            "bytes_per_participant": statistics.mean(
                (sum(r.cost.published_bytes) + sum(r.cost.received_bytes)) / args.participants for r in runs),
            "identical": sum(d is None for d in divergences), "first_token_agreement": agree / len(runs),
            "first_divergence": divergences, "largest_first_logprob_change": largest}
    native = summary["native"]["bytes_per_participant"]
    print(f"\n{args.problems} GSM8K prompts, {args.shots}-shot TokEx, N={args.participants}, H={args.sync_interval}, "
          f"H_g={args.generator_sync_interval}, {args.dtype}, {args.max_tokens} greedy tokens, against exact K/V")
    for wire, s in summary.items():
        print(f"{wire:>6}: {s['bytes_per_participant'] / 1024:9.1f} KiB per participant "
              f"({native / s['bytes_per_participant']:.2f}x fewer), identical {s['identical']}/{args.problems}, "
              f"first token {100 * s['first_token_agreement']:.0f}%, "
              f"largest first-token log-prob change {s['largest_first_logprob_change']:.2e}")
    return summary


def main() -> None:
    args = parse_args()
    from transformers import AutoConfig

    if args.part == "codec":
        dtype = getattr(torch, args.dtype)
        hf = AutoConfig.from_pretrained(resolve_model(args.model)).get_text_config(decoder=True)
        result = codec(args, ModelShape.from_hf_config(hf, dtype), hf.num_attention_heads, dtype)
    else:
        result = fidelity(args)
    out = args.out or Path(f"benchmarks/results/kv_wire_{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.processor() or platform.machine(),
                               "result": result}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
