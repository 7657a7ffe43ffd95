"""`python -m fedattn_vllm.demo`: three parties jointly answer a question none could answer alone.

Runs the reference oracle offline on the default model and prints each party's segment
length, the answer without any sync layer, with FedAttn at the chosen sync interval and
with every layer synced (H = 1, identical to centralised inference), and the K/V bytes
each party would exchange.
"""

from __future__ import annotations

import argparse
import time

PARTIES = [
    "Alice's note: the meeting with the supplier is in Lisbon. ",
    "Bob's note: the meeting is on Thursday at 3 pm. ",
    "Question: in which city is the meeting with the supplier, and on which day? Answer briefly.",
]


def _bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedattn_vllm.demo", description=__doc__)
    parser.add_argument("--model", default="default", help="model name, alias or local HF directory")
    parser.add_argument("--sync-interval", type=int, default=4, help="H: sync every H-th layer")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedattn_vllm.config import FedAttnConfig
    from fedattn_vllm.cost import ModelShape, participant_costs
    from fedattn_vllm.models import resolve_model
    from fedattn_vllm.oracle import FedAttnOracle
    from fedattn_vllm.prompting import encode_segments

    path = resolve_model(args.model)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    oracle = FedAttnOracle(model)
    segments = encode_segments(tokenizer, PARTIES, chat=True)
    shape = ModelShape.from_hf_config(model.config, dtype)

    print(f"model: {path.name} ({shape.num_layers} layers, {args.dtype}); {len(PARTIES)} parties")
    for n, seg in enumerate(segments):
        print(f"  party {n + 1}: {len(seg)} tokens of private text")
    for label, config in [
        ("no sync layers (each party alone)", FedAttnConfig(placement="explicit", sync_layers=())),
        (f"FedAttn H={args.sync_interval}", FedAttnConfig(sync_interval=args.sync_interval)),
        ("FedAttn H=1 (= centralised)", FedAttnConfig(sync_interval=1)),
    ]:
        started = time.perf_counter()
        out = oracle.generate(segments, config, args.max_new_tokens)
        answer = tokenizer.decode(out.tokens[len(segments) - 1], skip_special_tokens=True).strip()
        elapsed = time.perf_counter() - started
        plan = config.resolve(shape.num_layers, len(segments))
        print(f"\n{label}: {len(plan.sync_layers)} sync layers {list(plan.sync_layers)} ({elapsed:.1f} s)")
        print(f"  answer (party {len(segments)}): {answer!r}")
        for n, cost in enumerate(participant_costs(shape, plan, [len(s) for s in segments])):
            print(f"  party {n + 1}: uploads {_bytes(cost.upload_bytes)}, downloads {_bytes(cost.download_bytes)}")


if __name__ == "__main__":
    main()
