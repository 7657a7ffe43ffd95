"""Deterministic tiny random Qwen2 / Llama models with a small trained BPE tokenizer, for fast tests.

Useless for quality; shaped so vLLM's CPU backend runs them (head dim 64, GQA 2:1).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

SEED = 1234
VOCAB_SIZE = 512
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.1,  # peakier logits than 0.02: fewer near-ties in greedy decoding
)


def _corpus() -> list[str]:
    text = resources.files("fedattn_vllm.data").joinpath("gsm8k_cot_exemplars.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [f"Question: {r['question']}\nLet's think step by step\n{r['rationale']}\nThe answer is {r['answer']}\n\n" for r in rows]


def build_tokenizer():
    """A byte-level BPE with VOCAB_SIZE entries, trained on the GSM8K exemplars (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(name: str, out_dir: Path) -> None:
    """Write tiny-qwen2 or tiny-llama (random weights, seeded) with its tokenizer to `out_dir`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = build_tokenizer()
    config_cls = {"tiny-qwen2": Qwen2Config, "tiny-llama": LlamaConfig}[name]
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = config_cls(
        vocab_size=len(tokenizer), bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, **SHAPE
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = eos_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
