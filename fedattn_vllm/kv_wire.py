"""Shared K/V as they travel between participants: exact ('native') or int8 with scales.

Int8: keys with one scale per head and channel, values with one per token and head
(`kernels/quant.py`).

Both transports (in-process and networked) carry the encoded tensors, so colocated and
federated sessions compute on identical values and count identical bytes.
"""

from __future__ import annotations

import torch

from fedattn_vllm.config import KVWire
from fedattn_vllm.exchange import KV, Payload
from kernels import dequantize_int8, quantize_int8


def encode_kv(kv: KV, wire: KVWire) -> Payload:
    """What a participant publishes: (K, V) owned copies, or (K int8, V int8, K scales, V scales)."""
    if wire is KVWire.INT8:
        (k, k_scale), (v, v_scale) = quantize_int8(kv[0], dim=0), quantize_int8(kv[1], dim=-1)
        return k, v, k_scale, v_scale
    return kv[0].clone(), kv[1].clone()


def decode_kv(payload: Payload, wire: KVWire, dtype: torch.dtype) -> KV:
    """(K, V) in the engine's `dtype` from a published payload."""
    if wire is KVWire.INT8:
        k, v, k_scale, v_scale = payload
        return dequantize_int8(k, k_scale, dtype), dequantize_int8(v, v_scale, dtype)
    return payload[0], payload[1]
