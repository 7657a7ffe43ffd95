"""GSM8K few-shot prompts in the paper's format, split among participants."""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources

from fedattn_vllm.partition import SplitPolicy, split_prompt


@cache
def _rows(name: str) -> tuple[dict, ...]:
    text = resources.files("fedattn_vllm.data").joinpath(name).read_text()
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def problems() -> tuple[dict, ...]:
    """The GSM8K test split: dicts with 'question' and 'answer' ('... #### 42')."""
    return _rows("gsm8k_test.jsonl")


def exemplar_text(example: dict) -> str:
    return (f"Question: {example['question']}\nLet's think step by step\n{example['rationale']}\n"
            f"The answer is {example['answer']}\n\n")


def question_text(problem: dict) -> str:
    return f"Question: {problem['question']}\nLet's think step by step\n"


def reference_answer(problem: dict) -> str:
    return problem["answer"].split("####")[-1].strip()


def segments(tokenizer, problem: dict, shots: int, participants: int, policy: SplitPolicy | str) -> list[list[int]]:
    """Token segments of one problem's `shots`-shot prompt, split by `policy` among `participants`."""
    exemplars = [tokenizer(exemplar_text(e), add_special_tokens=False)["input_ids"]
                 for e in _rows("gsm8k_cot_exemplars.jsonl")[:shots]]
    question = tokenizer(question_text(problem), add_special_tokens=False)["input_ids"]
    return split_prompt(exemplars, question, participants, policy)


def solution_text(problem: dict) -> str:
    """The reference solution in the exemplars' format (calculator annotations dropped), for teacher forcing."""
    rationale, answer = problem["answer"].split("####")
    rationale = re.sub(r"<<[^>]*>>", "", rationale).strip()
    return f"{rationale}\nThe answer is {answer.strip()}\n\n"
