"""The vLLM plugin (entry point `vllm.general_plugins`): registers the FedAttn model classes.

Runs in every vLLM process, so it is cheap and idempotent and names classes by
"module:Class" strings; nothing heavy is imported until vLLM builds such a model.
"""

from __future__ import annotations

# stock architecture -> FedAttn architecture (kept here, import-free, for the engine API)
FEDATTN_ARCHITECTURES = {
    "Qwen2ForCausalLM": "FedAttnQwen2ForCausalLM",
    "LlamaForCausalLM": "FedAttnLlamaForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch in FEDATTN_ARCHITECTURES.values():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"fedattn_vllm.vllm_ext.models:{arch}")
