"""Shared K/V as they travel between participants: exact ('native') or quantised with their scales.

- int8: keys with one float32 scale per head and channel, values with one per token and head.
- int4, k4v2 (4-bit keys, 2-bit values), int2: asymmetric codes in groups (KIVI's split): keys
  per head and channel over groups of tokens, values per token and head over groups of channels,
  a float16 scale and minimum per group, in two tensors: every head's statistics, every head's
  codes (`kernels/quant.py`). The public prefix, where attention sinks sit, is never exchanged,
  so it stays exact.

Both transports (in-process and networked) carry the encoded tensors, so colocated and
federated sessions compute on identical values and count identical bytes; `payload_bytes`
is the size the cost model counts, equal to what the encoders produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedattn_vllm.config import KVWire
from fedattn_vllm.exchange import KV, KVExchangeError, Payload, kv_nbytes
from kernels import all_finite, dequantize_int8, dequantize_kv, quantize_int8, quantize_kv
from kernels.quant import PayloadLayout, payload_layout


@dataclass(frozen=True)
class LowBit:
    """Grouped asymmetric codes for keys (per channel) and values (per token): a payload is (statistics float16
    (1, H, S), codes uint8 (1, H, C)), row h head h's."""

    key_bits: int
    value_bits: int
    key_group: int  # tokens that share a key channel's scale and minimum
    value_group: int  # channels of a token and head that share a value scale and minimum

    def encode(self, kv: KV) -> Payload:
        return quantize_kv(*kv, self.key_bits, self.key_group, self.value_bits, self.value_group)

    def decode(self, payload: Payload, dtype: torch.dtype, shape: tuple[int, int, int]
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(K, V, whether every value is finite), K and V of (T, H, D) `shape` (the receiver's: the payload is checked
        against it). ValueError for anything but the two tensors of that shape's layout."""
        return dequantize_kv(payload, shape, self.key_bits, self.key_group, self.value_bits, self.value_group,
                             dtype)

    def layout(self, tokens: int, head_dim: int) -> PayloadLayout:
        """Where a head's codes, scales and minima of `tokens` tokens lie in its rows of a payload."""
        return payload_layout(tokens, head_dim, self.key_bits, self.key_group, self.value_bits, self.value_group)


LOW_BIT = {
    KVWire.INT4: LowBit(key_bits=4, value_bits=4, key_group=64, value_group=64),
    KVWire.K4V2: LowBit(key_bits=4, value_bits=2, key_group=64, value_group=32),
    KVWire.INT2: LowBit(key_bits=2, value_bits=2, key_group=32, value_group=32),
}


def encode_kv(kv: KV, wire: KVWire) -> Payload:
    """What a participant publishes: (K, V) owned copies, or their encoding with its scales."""
    if wire is KVWire.INT8:
        (k, k_scale), (v, v_scale) = quantize_int8(kv[0], dim=0), quantize_int8(kv[1], dim=-1)
        return k, v, k_scale, v_scale
    if wire in LOW_BIT:
        return LOW_BIT[wire].encode(kv)
    return kv[0].clone(), kv[1].clone()


def decode_kv(payload: Payload, wire: KVWire, dtype: torch.dtype, shape: tuple[int, int, int]) -> KV:
    """(K, V) of (T, H, D) `shape` in the engine's `dtype` from a published payload."""
    if wire in LOW_BIT:
        return LOW_BIT[wire].decode(payload, dtype, shape)[:2]
    if wire is KVWire.INT8:
        k, v, k_scale, v_scale = payload
        return dequantize_int8(k, k_scale, dtype), dequantize_int8(v, v_scale, dtype)
    return payload[0], payload[1]


def decode_checked(payload: Payload, wire: KVWire, dtype: torch.dtype, shape: tuple[int, int, int]) -> KV:
    """decode_kv of a payload from another party, checked to be what a (T, H_kv, D) `shape` encodes:
    its byte count, its decoded shapes and dtypes, finite values. KVExchangeError if not."""
    expected = payload_bytes(wire, *shape, dtype.itemsize)
    if kv_nbytes(payload) != expected:
        raise KVExchangeError(f"a {wire.value} payload of {shape} is {expected} bytes, got {kv_nbytes(payload)}")
    try:
        if wire in LOW_BIT:  # decoded into `shape` and `dtype`, the finite check in the decoding kernel's call
            k, v, fits = LOW_BIT[wire].decode(payload, dtype, shape)
        else:
            k, v = decode_kv(payload, wire, dtype, shape)
            fits = all(t.shape == shape and t.dtype == dtype for t in (k, v)) and all_finite(k) and all_finite(v)
    except (RuntimeError, ValueError, IndexError) as error:
        raise KVExchangeError(f"malformed {wire.value} payload: {error}") from None
    if not fits:
        raise KVExchangeError(f"a {wire.value} payload that does not decode to finite {tuple(shape)} {dtype}")
    return k, v


def questions_checked(payload: Payload, dtype: torch.dtype, shape: tuple[int, int, int]) -> torch.Tensor:
    """A generator's question queries from another party (question selection), checked to be one finite
    (rows, H, D) `shape` tensor of `dtype`; KVExchangeError if not."""
    if len(payload) != 1 or payload[0].shape != shape or payload[0].dtype != dtype or not all_finite(payload[0]):
        raise KVExchangeError(f"question queries that are not one finite {tuple(shape)} {dtype} tensor")
    return payload[0]


def payload_bytes(wire: KVWire, tokens: int, heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of one published payload of `tokens` tokens (K and V of `heads` heads of `head_dim`)."""
    if wire is KVWire.INT8:  # int8 K and V, a float32 scale per key channel and per value token (and head)
        return heads * (2 * tokens * head_dim + 4 * head_dim + 4 * tokens)
    if wire in LOW_BIT:
        layout = LOW_BIT[wire].layout(tokens, head_dim)
        return heads * (2 * layout.statistics + layout.codes)  # float16 statistics, code bytes
    return 2 * tokens * heads * head_dim * element_size
