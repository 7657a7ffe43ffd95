"""fedattn-vllm: Federated Attention for vLLM (engine-side library)."""

from importlib import import_module

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError, FedAttnPlan
from fedattn_vllm.schedule import Placement

# Heavier names load on first use: importing the package must stay cheap (vLLM plugin processes).
_LAZY = {
    "FedAttnOracle": "fedattn_vllm.oracle",
    "FederatedLLM": "fedattn_vllm.engine",
    "FedAttnSession": "fedattn_vllm.session",
    "FedAttnSessionError": "fedattn_vllm.session",
}

__all__ = ["FedAttnConfig", "FedAttnConfigError", "FedAttnPlan", "Placement", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(name)
