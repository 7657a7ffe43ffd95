"""What every engine-run subcommand of the eval CLI shares: its arguments and the engine they make."""

from __future__ import annotations

import argparse
from pathlib import Path

WIRES = ("native", "int8", "int4", "k4v2", "int2")  # fedattn_vllm.config.KVWire, without importing torch for --help


def add_run_arguments(p: argparse.ArgumentParser, out: Path, max_tokens: int) -> None:
    """Model, precision, which items, sampling budget, engine memory, and where the results go."""
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--kv-wire", default="native", choices=WIRES, help="encoding of the shared K/V")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=out, help="directory for the JSONL and summary")
    p.add_argument("--resume", action="store_true", help="skip the run if its summary is already in --out")


def engine(args: argparse.Namespace):
    """The FedAttn vLLM engine the arguments describe."""
    from fedattn_vllm.engine import FederatedLLM

    return FederatedLLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                        max_num_batched_tokens=max(16384, args.max_model_len), seed=args.seed,
                        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30))
