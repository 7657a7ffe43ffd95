"""fedattn-vllm: Federated Attention for vLLM (engine-side library)."""

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError, FedAttnPlan
from fedattn_vllm.schedule import Placement

__all__ = ["FedAttnConfig", "FedAttnConfigError", "FedAttnOracle", "FedAttnPlan", "Placement"]


def __getattr__(name: str):
    if name == "FedAttnOracle":  # lazy: importing the package must stay cheap (vLLM plugin processes)
        from fedattn_vllm.oracle import FedAttnOracle

        return FedAttnOracle
    raise AttributeError(name)
