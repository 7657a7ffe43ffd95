"""K/V quantisation for the wire, keys per channel and values per token (KIVI's split).

Keys carry a few large outlier channels, so they take their scales per head and channel
(over the message's tokens); values take theirs per token and head.

- int8: symmetric absmax, one float32 scale per slice.
- low-bit (2 or 4 bits): asymmetric, in groups along that axis (keys: groups of tokens,
  values: groups of channels); a float16 scale and minimum per group, rounded outward so
  the stored grid covers every value of its group; codes packed 8 // bits per byte along
  the channel axis.
- a payload: (statistics float16 (1, H, S), codes uint8 (1, H, C)), row h head h's own (keys'
  and values') statistics and codes (`payload_layout`), so that a payload splits and joins along
  the heads axis like K/V (tensor-parallel ranks each hold some heads), whoever holds it can
  check every statistic finite, and a receiver checks two exact shapes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_F16_MAX = torch.finfo(torch.float16).max


def quantize_int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H, D) -> (q int8 (T, H, D), float32 scales reduced over `dim`, kept as size 1).

    x ~ q * scale with |x - q * scale| <= scale / 2; keys: dim=0 (scale (1, H, D)), values: dim=-1 ((T, H, 1)).
    A slice holding a NaN or an infinity gets a NaN or infinite scale (its decode is not finite: receivers refuse
    it) and q 0 where x / scale is NaN.
    """
    scale = x.abs().amax(dim=dim, keepdim=True).float() / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero slice stays exactly zero
    q = torch.round(x.float() / scale).nan_to_num_(0.0).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(T, H, D) in `dtype` from `quantize_int8`'s output."""
    return (q.float() * scale).to(dtype)


def check_int8_payloads(payloads: Sequence[tuple[torch.Tensor, ...]], shapes: Sequence[tuple[int, int, int]]
                        ) -> tuple[int, int]:
    """(H, D) of a layer's int8 payloads of (T, H, D) `shapes` (one a source, one model's H and D), each checked to be
    contiguous (K codes int8 (T, H, D), V codes int8 (T, H, D), K scales float32 (1, H, D), V scales float32 (T, H,
    1)), the scales at addresses a float32 may have (they came from another party); ValueError if one is not."""
    heads, channels = common_heads(shapes)
    for payload, (tokens, *_) in zip(payloads, shapes, strict=True):
        expected = ((tokens, heads, channels), (tokens, heads, channels), (1, heads, channels), (tokens, heads, 1))
        if len(payload) != 4 or any(t.dtype != dtype or t.shape != shape or not t.is_contiguous() for t, shape, dtype
                                    in zip(payload, expected, (torch.int8, torch.int8, torch.float32, torch.float32))) \
                or payload[2].data_ptr() % 4 or payload[3].data_ptr() % 4:
            raise ValueError(f"an int8 payload must be contiguous int8 codes {expected[0]} (keys, values) and float32 "
                             f"scales {expected[2]}, {expected[3]}: got {[(t.dtype, tuple(t.shape)) for t in payload]}")
    return heads, channels


def common_heads(shapes: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
    """The (H, D) every one of a layer's (T, H, D) `shapes` has; ValueError if they differ (or there are none)."""
    if not shapes or any(tuple(shape[1:]) != tuple(shapes[0][1:]) for shape in shapes):
        raise ValueError(f"payloads of one (H, D): got shapes {list(shapes)}")
    return shapes[0][1], shapes[0][2]


def dequantize_int8_kv(payloads: Sequence[tuple[torch.Tensor, ...]], shapes: Sequence[tuple[int, int, int]],
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """A layer's int8 payloads (K codes, V codes, K scales, V scales) of (T, H, D) `shapes`: (K, V, whether every
    decoded value is finite), K and V (sum of T, H, D) in `dtype`, the sources' tokens one after another.
    ValueError where a payload is not its shape's."""
    check_int8_payloads(payloads, shapes)
    k = torch.cat([dequantize_int8(p[0], p[2], dtype) for p in payloads])
    v = torch.cat([dequantize_int8(p[1], p[3], dtype) for p in payloads])
    return k, v, bool(torch.isfinite(k).all() and torch.isfinite(v).all())


def quantize_groups(x: torch.Tensor, bits: int, dim: int, group: int) -> tuple[torch.Tensor, ...]:
    """x (T, H, D) -> (codes uint8 (T, H, ceil(D * bits / 8)), scale, minimum), asymmetric in groups along `dim`.

    dim=0 (keys): groups of `group` tokens per head and channel, scale and minimum (ceil(T / group), H, D).
    dim=-1 (values): groups of `group` channels per token and head, (T, H, ceil(D / group)).
    x ~ minimum + code * scale within half a step; magnitudes beyond float16's range are clamped to it.
    """
    levels = (1 << bits) - 1
    groups = _split_groups(x.float().clamp(-_F16_MAX, _F16_MAX), dim, group)  # (..., n_groups, group)
    smallest, largest = (t + 0.0 for t in torch.aminmax(groups, dim=-1))  # a zero extreme as +0, whatever its order
    low = _round_toward(smallest, -torch.inf)
    scale = _round_toward((largest - low.float()) / levels, torch.inf)
    step = torch.where(scale > 0, scale.float(), 1.0)  # a constant group is its minimum, exactly
    codes = torch.round((groups - low.float()[..., None]) / step[..., None]).clamp_(0, levels).to(torch.uint8)
    codes = _join_groups(codes, dim, x.shape[dim])
    return _pack(codes, bits), scale.movedim(-1, dim), low.movedim(-1, dim)


def packed_channels(channels: int, bits: int) -> int:
    """Bytes a token and head's `channels` codes of `bits` bits take packed."""
    return -(-channels * bits // 8)


def stats_shape(shape: tuple[int, int, int], dim: int, group: int) -> tuple[int, int, int]:
    """The scale / minimum shape of (T, H, D) codes: keys (dim 0) per group of tokens, values per group of channels."""
    tokens, heads, channels = shape
    if dim == 0:
        return -(-tokens // group), heads, channels
    return tokens, heads, -(-channels // group)


def check_codes(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int, dim: int, group: int,
                channels: int) -> None:
    """ValueError naming the tensor unless codes are uint8 (T, H, ceil(channels * bits / 8)) and scale and minimum
    float16 of `stats_shape`: what `quantize_groups` writes (payloads come from other parties)."""
    if codes.dim() != 3 or codes.dtype != torch.uint8 or codes.shape[-1] != packed_channels(channels, bits):
        raise ValueError(f"codes of {channels} {bits}-bit channels: got {codes.dtype} {tuple(codes.shape)}")
    stats = stats_shape((*codes.shape[:2], channels), dim, group)
    for name, t in (("scale", scale), ("minimum", low)):
        if t.dtype != torch.float16 or tuple(t.shape) != stats:
            raise ValueError(f"{name} of codes {tuple(codes.shape)} must be float16 {stats}: got {t.dtype} "
                             f"{tuple(t.shape)}")


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int, dim: int, group: int,
                      channels: int, dtype: torch.dtype) -> torch.Tensor:
    """(T, H, channels) in `dtype` from `quantize_groups`'s output (`channels`: D before packing); `check_codes`
    first."""
    check_codes(codes, scale, low, bits, dim, group, channels)
    q = _unpack(codes, bits, channels).float()
    groups = _split_groups(q, dim, group)  # (..., n_groups, group)
    low, scale = (t.float().movedim(dim, -1)[..., None] for t in (low, scale))  # (..., n_groups, 1)
    return _join_groups(low + groups * scale, dim, q.shape[dim]).to(dtype)


@dataclass(frozen=True)
class PayloadLayout:
    """Where each part of a head's payload lies: its float16 statistics in that head's row of the statistics tensor
    (offsets in elements), its codes in that head's row of the codes tensor (offsets in bytes)."""

    shapes: tuple[tuple[int, int], ...]  # one head's part, (rows, columns), in `PARTS` order
    offsets: tuple[int, ...]
    statistics: int  # float16 statistics a head
    codes: int  # code bytes a head


PARTS = ("key codes", "key scale", "key minimum", "value codes", "value scale", "value minimum")
_CODES, _STATISTICS = (0, 3), (1, 2, 4, 5)  # the parts of each tensor, in the order they lie in it


@functools.lru_cache(maxsize=4096)  # a layout per message size
def payload_layout(tokens: int, channels: int, key_bits: int, key_group: int, value_bits: int,
                   value_group: int) -> PayloadLayout:
    """A head's share of a payload of T `tokens` keys quantised per channel in groups of `key_group` tokens and
    values per token in groups of `value_group` of their `channels` channels."""
    key_stats = stats_shape((tokens, 1, channels), 0, key_group)[::2]
    value_stats = stats_shape((tokens, 1, channels), -1, value_group)[::2]
    shapes = ((tokens, packed_channels(channels, key_bits)), key_stats, key_stats,
              (tokens, packed_channels(channels, value_bits)), value_stats, value_stats)
    offsets, ends = [0] * len(PARTS), []
    for parts in (_STATISTICS, _CODES):
        at = 0
        for part in parts:
            offsets[part], at = at, at + math.prod(shapes[part])
        ends.append(at)
    return PayloadLayout(shapes, tuple(offsets), *ends)


def check_payload(payload: tuple[torch.Tensor, ...], layout: PayloadLayout, heads: int) -> None:
    """ValueError unless `payload` is (statistics float16 (1, heads, S), codes uint8 (1, heads, C)) of the layout,
    both contiguous, the statistics at an even address (it came from another party)."""
    if len(payload) == 2:
        statistics, codes = payload
        if statistics.dtype == torch.float16 and codes.dtype == torch.uint8 \
                and statistics.shape == (1, heads, layout.statistics) and codes.shape == (1, heads, layout.codes) \
                and statistics.is_contiguous() and codes.is_contiguous() and not statistics.data_ptr() % 2:
            return
    raise ValueError(f"a payload must be contiguous float16 (1, {heads}, {layout.statistics}) statistics and uint8 "
                     f"(1, {heads}, {layout.codes}) codes: got {[(t.dtype, tuple(t.shape)) for t in payload]}")


def split_payload(payload: tuple[torch.Tensor, ...], layout: PayloadLayout) -> tuple[torch.Tensor, ...]:
    """The parts of a (statistics, codes) payload as views, each as `quantize_groups` lays it out ((rows, H,
    columns)): key codes, scale, minimum, value codes, scale, minimum."""
    statistics, codes = payload
    heads = codes.shape[1]
    return tuple((codes if part in _CODES else statistics)[0, :, offset:offset + math.prod(shape)]
                 .view(heads, *shape).transpose(0, 1) for part, (shape, offset) in enumerate(zip(layout.shapes,
                                                                                                layout.offsets)))


def quantize_kv(k: torch.Tensor, v: torch.Tensor, key_bits: int, key_group: int, value_bits: int,
                value_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v (T, H, D) -> their payload: `quantize_groups(k, key_bits, 0, key_group)` and `quantize_groups(v,
    value_bits, -1, value_group)`, each head's statistics in its row of one float16 (1, H, S) tensor and its codes in
    its row of one uint8 (1, H, C) tensor (`payload_layout`)."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"keys and values of one (T, H, D) shape: got {tuple(k.shape)} and {tuple(v.shape)}")
    tokens, heads, channels = k.shape
    parts = (*quantize_groups(k, key_bits, 0, key_group), *quantize_groups(v, value_bits, -1, value_group))
    layout = payload_layout(tokens, channels, key_bits, key_group, value_bits, value_group)
    return tuple(torch.cat([parts[part].transpose(0, 1).reshape(heads, math.prod(layout.shapes[part]))
                            for part in order], dim=1)[None] for order in (_STATISTICS, _CODES))


def check_payloads(payloads: Sequence[tuple[torch.Tensor, ...]], shapes: Sequence[tuple[int, int, int]],
                   key_bits: int, key_group: int, value_bits: int, value_group: int
                   ) -> tuple[int, int, list[PayloadLayout]]:
    """(H, D, each payload's layout) of a layer's payloads of (T, H, D) `shapes` (one a source, one model's H and D),
    each checked by `check_payload` against its own shape; ValueError if one is not its shape's."""
    heads, channels = common_heads(shapes)
    layouts = [payload_layout(shape[0], channels, key_bits, key_group, value_bits, value_group) for shape in shapes]
    for payload, layout in zip(payloads, layouts, strict=True):
        check_payload(payload, layout, heads)
    return heads, channels, layouts


def dequantize_kv(payloads: Sequence[tuple[torch.Tensor, ...]], shapes: Sequence[tuple[int, int, int]], key_bits: int,
                  key_group: int, value_bits: int, value_group: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """`quantize_kv`'s inverse for payloads of (T, H, D) `shapes` (a layer's, one a source): (K, V, whether every
    decoded value is finite), K and V (sum of T, H, D) in `dtype`, the sources' tokens one after another. ValueError
    where a payload is not its shape's."""
    _, channels, layouts = check_payloads(payloads, shapes, key_bits, key_group, value_bits, value_group)
    keys, values = [], []
    for payload, layout in zip(payloads, layouts):
        k_codes, k_scale, k_low, v_codes, v_scale, v_low = split_payload(payload, layout)
        keys.append(dequantize_groups(k_codes, k_scale, k_low, key_bits, 0, key_group, channels, dtype))
        values.append(dequantize_groups(v_codes, v_scale, v_low, value_bits, -1, value_group, channels, dtype))
    k, v = torch.cat(keys), torch.cat(values)
    return k, v, bool(torch.isfinite(k).all() and torch.isfinite(v).all())


def _round_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """x (float32) as float16, rounded toward `direction` where rounding to nearest went the other way."""
    h = x.to(torch.float16)
    wrong = h.float() > x if direction < 0 else h.float() < x
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, direction)), h)


def _split_groups(x: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """(T, H, D) -> `dim` moved last and split into (n_groups, group), the last group padded with its last value."""
    x = x.movedim(dim, -1)
    pad = -x.shape[-1] % group
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.unflatten(-1, (-1, group))


def _join_groups(groups: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Inverse of `_split_groups`: (..., n_groups, group) -> (T, H, D), the padding dropped."""
    return groups.flatten(-2)[..., :size].movedim(-1, dim)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(T, H, D) codes < 2**bits -> (T, H, ceil(D * bits / 8)) uint8, channel c in bits [bits*(c % k), ...) of byte c // k."""
    per_byte = 8 // bits
    pad = -codes.shape[-1] % per_byte
    codes = torch.nn.functional.pad(codes, (0, pad)).unflatten(-1, (-1, per_byte))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, channels: int) -> torch.Tensor:
    """Inverse of `_pack`: (T, H, ceil(D * bits / 8)) uint8 -> (T, H, channels) codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)[..., :channels]
