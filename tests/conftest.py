"""Shared fixtures: seeded torch, tiny random models (fast), the real default model (slow)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for a hub

import pytest
import torch
from transformers.utils import logging as hf_logging

from fedattn_vllm.models import resolve_model

hf_logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def load_hf(name: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session", params=["tiny-qwen2", "tiny-llama"])
def tiny(request):
    """(model, tokenizer) of each tiny random architecture, fp32."""
    return load_hf(request.param)


@pytest.fixture(scope="session")
def real_model():
    """The default real model (Qwen2.5-Coder-0.5B-Instruct), fp32."""
    return load_hf("default")
