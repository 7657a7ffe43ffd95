"""Split a GSM8K few-shot prompt among N participants (TokEx) and answer it with the reference oracle.

    .venv/bin/python examples/oracle_gsm8k.py --participants 4 --sync-interval 4 --index 0
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedattn_vllm import FedAttnConfig, FedAttnOracle, gsm8k
from fedattn_vllm.models import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--sync-interval", type=int, default=4)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--policy", default="TokEx", choices=["TokAg", "SemAg", "TokEx", "SemEx"])
    parser.add_argument("--index", type=int, default=0, help="which GSM8K test problem")
    args = parser.parse_args()

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
    problem = gsm8k.problems()[args.index]
    segments = gsm8k.segments(tokenizer, problem, args.shots, args.participants, args.policy)
    out = FedAttnOracle(model).generate(segments, FedAttnConfig(sync_interval=args.sync_interval), 256)
    print("segment lengths:", [len(s) for s in segments])
    print(tokenizer.decode(out.tokens[len(segments) - 1], skip_special_tokens=True))
    print("reference answer:", gsm8k.reference_answer(problem))


if __name__ == "__main__":
    main()
