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
from kernels import all_finite, dequantize_int8_kv, dequantize_kv, quantize_int8, quantize_kv
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


class Int8:
    """Symmetric int8 codes: a payload is (K codes int8 (T, H, D), V codes, K scales float32 (1, H, D), one a head
    and channel, V scales (T, H, 1), one a token and head)."""

    def encode(self, kv: KV) -> Payload:
        (k, k_scale), (v, v_scale) = quantize_int8(kv[0], dim=0), quantize_int8(kv[1], dim=-1)
        return k, v, k_scale, v_scale

    def decode(self, payloads: Sequence[Payload], dtype: torch.dtype, shapes: Sequence[tuple[int, int, int]]
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """As `LowBit.decode`: ValueError for anything but the four tensors of a shape's payload."""
        return dequantize_int8_kv(payloads, shapes, dtype)


CODECS: dict[KVWire, LowBit | Int8] = {KVWire.INT8: Int8(), **LOW_BIT}  # every encoding but exact K/V


def encode_kv(kv: KV, wire: KVWire) -> Payload:
    """What a participant publishes: (K, V) owned copies, or their encoding with its scales."""
    if wire in CODECS:
        return CODECS[wire].encode(kv)
    return kv[0].clone(), kv[1].clone()


def decode_checked(payloads: Sequence[Payload], wire: KVWire, dtype: torch.dtype,
                   shapes: Sequence[tuple[int, int, int]]) -> list[KV]:
    """Payloads from other parties (a layer's, one a source) as (K, V) parts in the engine's `dtype`, the sources'
    tokens in order: one part for encoded payloads (decoded in one kernel call), each payload's own for exact K/V
    (not copied). Each payload is checked to be what its (T, H_kv, D) shape encodes: its tensors' shapes and dtypes
    (so its byte count), finite decoded values; KVExchangeError if not."""
    if len(payloads) != len(shapes):
        raise KVExchangeError(f"{len(payloads)} payloads for {len(shapes)} sources")
    if not payloads:
        return []
    try:
        if wire in CODECS:  # each payload's tensors checked against its shape, the finite check in the kernel's call
            k, v, fits = CODECS[wire].decode(payloads, dtype, shapes)
            parts = [(k, v)]
        else:
            parts = [_exact(payload, dtype, shape) for payload, shape in zip(payloads, shapes)]
            fits = all(all_finite(t) for kv in parts for t in kv)
    except (RuntimeError, ValueError, IndexError) as error:
        raise KVExchangeError(f"malformed {wire.value} payload: {error}") from None
    if not fits:
        raise KVExchangeError(f"{wire.value} payloads that do not decode to finite {dtype} K/V of their shapes "
                              f"{[tuple(shape) for shape in shapes]}")
    return parts


def _exact(payload: Payload, dtype: torch.dtype, shape: tuple[int, int, int]) -> KV:
    """An exact payload's own (K, V); ValueError unless it is two `dtype` tensors of `shape`."""
    if len(payload) != 2 or any(t.dtype != dtype or t.shape != shape for t in payload):
        raise ValueError(f"exact K/V must be two {dtype} tensors {tuple(shape)} ({kv_nbytes(payload)} bytes, "
                         f"{payload_bytes(KVWire.NATIVE, *shape, dtype.itemsize)} expected): got "
                         f"{[(t.dtype, tuple(t.shape)) for t in payload]}")
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
