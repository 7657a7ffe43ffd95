"""FedAttn model classes: stock vLLM Qwen2 / Llama whose attention impls carry the sync-layer hook.

One generic mixin; each supported architecture is a one-line subclass registered by
"module:Class" string in `fedattn_vllm.plugin`.
"""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from fedattn_vllm.exchange import InProcessKVExchange, PayloadKind
from fedattn_vllm.vllm_ext.attention import fedattn_impl_class
from fedattn_vllm.vllm_ext.batch import install_runner_hook
from fedattn_vllm.vllm_ext.sessions import REGISTRY
from fedattn_vllm.vllm_ext.surface import replicates_kv_heads, swap_attention_impls


class FedAttnModelMixin:
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install_runner_hook()
        swap_attention_impls(self, fedattn_impl_class)
        if replicates_kv_heads(vllm_config):  # its K/V are another rank's: the bytes count there, once
            REGISTRY.exchange = InProcessKVExchange(counted=frozenset({PayloadKind.QUESTIONS}))


class FedAttnQwen2ForCausalLM(FedAttnModelMixin, Qwen2ForCausalLM):
    """vLLM's Qwen2 with the sync-layer hook in every attention layer."""


class FedAttnLlamaForCausalLM(FedAttnModelMixin, LlamaForCausalLM):
    """vLLM's Llama with the sync-layer hook in every attention layer."""
