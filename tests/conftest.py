"""Shared fixtures: seeded torch, tiny random models (fast), the real default model (slow), vLLM engines.

Engines are expensive to start, so each is built once per test run and shared.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for a hub
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; tests hold several

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


# Tiny engines: a budget smaller than a batch of sessions, so admission mixes prefill and decode.
TINY_ENGINE_ARGS = {"dtype": "float32", "max_model_len": 256, "max_num_batched_tokens": 256, "seed": 0}


@functools.cache
def federated_engine(name: str, **engine_args):
    from fedattn_vllm.engine import FederatedLLM

    return FederatedLLM(name, **(engine_args or TINY_ENGINE_ARGS))


@functools.cache
def plain_engine(name: str, **engine_args):
    """Stock vLLM (the model's own architecture) with the same engine arguments."""
    from vllm import LLM

    args = {"enforce_eager": True, **(engine_args or TINY_ENGINE_ARGS)}
    return LLM(model=str(resolve_model(name)), **args)


@pytest.fixture(scope="session", params=["tiny-qwen2", "tiny-llama"])
def tiny_engine(request):
    """A FedAttn vLLM engine on a tiny random model, with its HF twin's oracle (fp32)."""
    from fedattn_vllm.oracle import FedAttnOracle

    model, tokenizer = load_hf(request.param)
    return SimpleNamespace(name=request.param, llm=federated_engine(request.param),
                           oracle=FedAttnOracle(model), hf=model, tokenizer=tokenizer)
