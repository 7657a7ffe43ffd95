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
    """Register the FedAttn model classes, unless the installed vLLM is not the series FedAttn reads (then
    plain vLLM runs untouched and `FederatedLLM` says why it cannot start)."""
    import logging

    from fedattn_vllm.vllm_ext.surface import unsupported_vllm

    if (why := unsupported_vllm()) is not None:
        logging.getLogger(__name__).warning("%s: FedAttn's models are not registered", why)
        return
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch in FEDATTN_ARCHITECTURES.values():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"fedattn_vllm.vllm_ext.models:{arch}")
