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

from collections.abc import Sequence
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

    def decode(self, payloads: Sequence[Payload], dtype: torch.dtype, shapes: Sequence[tuple[int, int, int]]
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(K, V, whether every value is finite) of payloads of (T, H, D) `shapes` (the receiver's: each payload is
        checked against its own), the sources' tokens one after another, in one kernel call. ValueError for anything
        but the two tensors of a shape's layout."""
        return dequantize_kv(payloads, shapes, self.key_bits, self.key_group, self.value_bits, self.value_group,
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


def decode_checked(payloads: Sequence[Payload], wire: KVWire, dtype: torch.dtype,
                   shapes: Sequence[tuple[int, int, int]]) -> list[KV]:
    """Payloads from other parties (a layer's, one a source) as (K, V) parts in the engine's `dtype`, the sources'
    tokens in order: one part for low-bit payloads (decoded in one kernel call), each payload's own otherwise (exact
    K/V are not copied). Each payload is checked to be what its (T, H_kv, D) shape encodes: its tensors' shapes and
    dtypes (so its byte count), its decoded shapes and dtypes, finite values; KVExchangeError if not."""
    if len(payloads) != len(shapes):
        raise KVExchangeError(f"{len(payloads)} payloads for {len(shapes)} sources")
    if wire not in LOW_BIT:  # a low-bit payload's decoder checks each of its tensors against its shape's layout
        for payload, shape in zip(payloads, shapes):
            expected = payload_bytes(wire, *shape, dtype.itemsize)
            if kv_nbytes(payload) != expected:
                raise KVExchangeError(f"a {wire.value} payload of {shape} is {expected} bytes, "
                                      f"got {kv_nbytes(payload)}")
    if not payloads:
        return []
    try:
        if wire in LOW_BIT:  # decoded into `shapes` and `dtype`, the finite check in the decoding kernel's call
            k, v, fits = LOW_BIT[wire].decode(payloads, dtype, shapes)
            parts = [(k, v)]
        else:
            parts = [_decode_exact_or_int8(payload, wire, dtype) for payload in payloads]
            fits = all(t.shape == shape and t.dtype == dtype and all_finite(t)
                       for kv, shape in zip(parts, shapes) for t in kv)
    except (RuntimeError, ValueError, IndexError) as error:
        raise KVExchangeError(f"malformed {wire.value} payload: {error}") from None
    if not fits:
        raise KVExchangeError(f"{wire.value} payloads that do not decode to finite {dtype} K/V of their shapes "
                              f"{[tuple(shape) for shape in shapes]}")
    return parts


def _decode_exact_or_int8(payload: Payload, wire: KVWire, dtype: torch.dtype) -> KV:
    """(K, V) of an exact payload (its own tensors) or an int8 one (dequantised to `dtype`)."""
    if wire is KVWire.INT8:
        k, v, k_scale, v_scale = payload
        return dequantize_int8(k, k_scale, dtype), dequantize_int8(v, v_scale, dtype)
    return payload[0], payload[1]


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
