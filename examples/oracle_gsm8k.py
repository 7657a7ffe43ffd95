"""Split a GSM8K few-shot prompt among N participants (TokEx) and answer it with the reference oracle.

    .venv/bin/python examples/oracle_gsm8k.py --participants 4 --sync-interval 4 --index 0
"""

from __future__ import annotations

import argparse
import json
from importlib import resources

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedattn_vllm import FedAttnConfig, FedAttnOracle
from fedattn_vllm.models import resolve_model
from fedattn_vllm.partition import split_prompt


def _rows(name: str) -> list[dict]:
    text = resources.files("fedattn_vllm.data").joinpath(name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
    shots = _rows("gsm8k_cot_exemplars.jsonl")[: args.shots]
    problem = _rows("gsm8k_test.jsonl")[args.index]
    exemplars = [
        tokenizer(f"Question: {e['question']}\nLet's think step by step\n{e['rationale']}\n"
                  f"The answer is {e['answer']}\n\n", add_special_tokens=False)["input_ids"]
        for e in shots
    ]
    question = tokenizer(f"Question: {problem['question']}\nLet's think step by step\n",
                         add_special_tokens=False)["input_ids"]
    segments = split_prompt(exemplars, question, args.participants, args.policy)
    out = FedAttnOracle(model).generate(segments, FedAttnConfig(sync_interval=args.sync_interval), 256)
    print("segment lengths:", [len(s) for s in segments])
    print(tokenizer.decode(out.tokens[len(segments) - 1], skip_special_tokens=True))
    print("reference answer:", problem["answer"].split("####")[-1].strip())


if __name__ == "__main__":
    main()
