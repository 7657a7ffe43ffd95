"""Sync-layer attention, one layer's work: the torch path against vLLM's own CPU kernel, side by side in one run.

    .venv/bin/python benchmarks/sync_kernels.py

Prefill: one participant's segment rows over [public prefix, foreign, own segment]. The torch path is torch's
fused flash kernel over its own keys (causal) and over the foreign keys, merged by log-sum-exp
(`kernels.fused`); the vLLM path copies the keys into vLLM's paged layout and runs its CPU attention kernel once
(`kernels.paged`; the copy is timed with it). Decode: B generators' new tokens, each over its own keys, as one
padded torch softmax (`kernels.decode_attention`) or vLLM's kernel over keys already held paged. The default
model's heads (14 query, 2 KV, 64 channels), fp32 as the engine benchmarks run; medians of --repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from kernels import decode_attention, fused_partial_attention, merge_attention
from kernels.paged import PagedKeys, paged_attention, pool_for
from timing import median_seconds

HEADS, KV_HEADS, DIM, BLOCK = 14, 2, 64, 128
PREFILL = [(0, 226, 678), (0, 73, 678), (20, 500, 1500)]  # (prefix, segment, foreign) tokens
DECODE = [(8, 900)]  # (generators, keys each)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sync_kernels.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype, scale = torch.float32, DIM ** -0.5
    isa = _get_attn_isa(dtype, BLOCK, DIM)

    def kv(tokens: int):
        return torch.randn(tokens, KV_HEADS, DIM), torch.randn(tokens, KV_HEADS, DIM)

    rows = []
    for prefix, segment, foreign in PREFILL:
        query, own, far = torch.randn(segment, HEADS, DIM), kv(prefix + segment), kv(foreign)

        def torch_path():
            return merge_attention(*fused_partial_attention(query, *far, scale),
                                   *fused_partial_attention(query, *own, scale, causal=True))[0]

        def vllm_path():
            held = PagedKeys(pool_for(own[0], BLOCK, isa))
            held.append((own[0][:prefix], own[1][:prefix]), far, (own[0][prefix:], own[1][prefix:]))
            return paged_attention(query, [segment], [held], scale)

        rows.append({"kind": "prefill", "prefix": prefix, "segment": segment, "foreign": foreign,
                     "max_abs_diff": float((torch_path() - vllm_path()).abs().max()),
                     "torch_ms": 1e3 * median_seconds(torch_path, args.repeats),
                     "vllm_ms": 1e3 * median_seconds(vllm_path, args.repeats)})
    for generators, keys in DECODE:
        queries = torch.randn(generators, HEADS, DIM)
        sets = [kv(keys + 13 * b) for b in range(generators)]
        held = []
        for k, v in sets:
            held.append(PagedKeys(pool_for(k, BLOCK, isa)))
            held[-1].append((k, v))

        def torch_decode():
            return decode_attention(queries, [k for k, _ in sets], [v for _, v in sets], scale)

        def vllm_decode():
            return paged_attention(queries, [1] * generators, held, scale)  # every generator in one call

        rows.append({"kind": "decode", "generators": generators, "keys": keys,
                     "max_abs_diff": float((torch_decode() - vllm_decode()).abs().max()),
                     "torch_ms": 1e3 * median_seconds(torch_decode, args.repeats),
                     "vllm_ms": 1e3 * median_seconds(vllm_decode, args.repeats)})
    print(f"one layer, fp32, {torch.get_num_threads()} threads, median of {args.repeats}, vLLM isa {isa}")
    for r in rows:
        shape = (f"prefix {r['prefix']}, segment {r['segment']}, foreign {r['foreign']}" if r["kind"] == "prefill"
                 else f"{r['generators']} generators x {r['keys']}+ keys")
        print(f"{r['kind']:<8} {shape:<40} torch {r['torch_ms']:7.3f} ms  vLLM {r['vllm_ms']:7.3f} ms  "
              f"({r['torch_ms'] / r['vllm_ms']:.2f}x)  max |diff| {r['max_abs_diff']:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(), "isa": isa, "rows": rows},
                                   indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
