"""Grouped low-bit K/V codes on the C kernel (`kernels/quant.c`), bit for bit `kernels.quant`'s reference (where
an input is NaN, both give NaN, not always the same NaN bits), and the finite check of a received payload.

The reference spends most of a short message's time in the fixed cost of ~30 small torch ops
per tensor; the kernel makes a few passes in one call. CPU tensors only; elsewhere (or with no
C compiler, or with `FEDATTN_NATIVE_KERNELS=0`) the reference runs. Decoding checks every shape and dtype
before the kernel reads a byte: payloads come from other parties.
"""

from __future__ import annotations

import array
import ctypes
import functools
from collections.abc import Sequence

import torch

from kernels import quant
from kernels.native import library

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_PARTS = ctypes.POINTER(ctypes.c_int64)  # the kernel's Parts: each part's offset in a head's row, quant.PARTS order


def _kernel() -> ctypes.CDLL | None:
    lib = library("quant")
    return None if lib is None else _typed(lib)


@functools.cache
def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with its functions' argument and result types declared (once)."""
    signatures = {  # name: (argument types, result type)
        "quantize_tokens": ([_PTR, _INT, _I64, _I64, _I64, _I64, _I64, _INT, _I64, _PTR, _PTR, _PTR], _INT),
        "quantize_channels": ([_PTR, _INT, _I64, _I64, _I64, _I64, _INT, _I64, _PTR, _PTR, _PTR], _INT),
        "dequantize_tokens": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT, _I64, _PTR, _I64, _INT], _INT),
        "dequantize_channels": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _INT, _I64, _PTR, _I64, _INT], _INT),
        "all_finite": ([_PTR, _I64, _INT], _INT),
        "quantize_int8": ([_PTR, _INT, _I64, _I64, _INT, _PTR, _PTR], _INT),
        "dequantize_int8_kv": ([_PTR, _I64, _I64, _I64, _PTR, _PTR, _INT], _INT),
        "quantize_kv": ([_PTR, _PTR, _INT, _I64, _I64, _I64, _INT, _I64, _I64, _INT, _I64, _I64, _PTR, _I64, _PTR, _I64,
                         _PARTS], _INT),
        "dequantize_kv": ([_PTR, _I64, _I64, _I64, _INT, _I64, _I64, _INT, _I64, _I64, _PTR, _PTR, _INT], _INT),
    }
    for name, (arguments, result) in signatures.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = arguments, result
    return lib


def available() -> bool:
    """Whether the C kernel built and loaded here."""
    return _kernel() is not None


_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernel's element types


def _kernel_for(tensor: torch.Tensor, bits: int, dim: int, group: int, dtype: torch.dtype) -> ctypes.CDLL | None:
    """The kernel where it serves these codes (CPU tensors of its widths and element types), else None."""
    if tensor.is_cpu and bits in (2, 4, 8) and dim in (0, -1, 2) and group >= 1 and dtype in _DTYPES:
        return _kernel()
    return None


def _check(status: int) -> None:
    if status:  # the kernel's scratch (torch's own allocation failures are RuntimeErrors too)
        raise RuntimeError("the quant kernel could not allocate its scratch")


def quantize_groups(x: torch.Tensor, bits: int, dim: int, group: int) -> tuple[torch.Tensor, ...]:
    """`kernels.quant.quantize_groups`: x (T, H, D) -> (codes uint8 (T, H, ceil(D * bits / 8)), scale, minimum)."""
    if x.dim() != 3 or (kernel := _kernel_for(x, bits, dim, group, x.dtype)) is None:
        return quant.quantize_groups(x, bits, dim, group)
    x = x.contiguous()
    tokens, heads, channels = x.shape
    codes, scale, low = _empty_codes(x.shape, bits, dim, group)
    packed = codes.shape[-1]
    pointers = codes.data_ptr(), scale.data_ptr(), low.data_ptr()
    if dim == 0:
        _check(kernel.quantize_tokens(x.data_ptr(), _DTYPES[x.dtype], tokens, heads, channels, heads * channels,
                                      group, bits, packed, *pointers))
    else:
        _check(kernel.quantize_channels(x.data_ptr(), _DTYPES[x.dtype], tokens * heads, channels, channels, group,
                                        bits, packed, *pointers))
    return codes, scale, low


def _empty_codes(shape: torch.Size, bits: int, dim: int, group: int) -> tuple[torch.Tensor, ...]:
    """(codes, scale, minimum) of (T, H, D) values as `quant.quantize_groups` lays them out, for the kernel to fill."""
    tokens, heads, channels = shape
    stats = quant.stats_shape(shape, dim, group)
    return (torch.empty(tokens, heads, quant.packed_channels(channels, bits), dtype=torch.uint8),
            torch.empty(stats, dtype=torch.float16), torch.empty(stats, dtype=torch.float16))


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int, dim: int, group: int,
                      channels: int, dtype: torch.dtype) -> torch.Tensor:
    """`kernels.quant.dequantize_groups`: (T, H, channels) in `dtype`. ValueError naming the tensor whose shape or
    dtype does not fit the codes."""
    kernel = _kernel_for(codes, bits, dim, group, dtype)
    if kernel is None or scale.device != codes.device or low.device != codes.device:
        return quant.dequantize_groups(codes, scale, low, bits, dim, group, channels, dtype)
    quant.check_codes(codes, scale, low, bits, dim, group, channels)
    tokens, heads, packed = codes.shape
    out = torch.empty(tokens, heads, channels, dtype=dtype)
    codes, scale, low = codes.contiguous(), scale.contiguous(), low.contiguous()  # held while the kernel reads them
    pointers = codes.data_ptr(), scale.data_ptr(), low.data_ptr()
    if dim == 0:
        _check(kernel.dequantize_tokens(*pointers, tokens, heads, channels, group, bits, packed, out.data_ptr(),
                                        heads * channels, _DTYPES[dtype]))
    else:
        _check(kernel.dequantize_channels(*pointers, tokens * heads, channels, group, bits, packed, out.data_ptr(),
                                          channels, _DTYPES[dtype]))
    return out


def quantize_int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.quant.quantize_int8`: x (T, H, D) -> (q int8 (T, H, D), float32 scale (1, H, D) for dim 0 or (T, H,
    1) for dim -1), in one call."""
    kernel = _kernel() if x.dim() == 3 and x.numel() and x.is_cpu and x.dtype in _DTYPES and dim in (0, -1, 2) \
        else None  # an empty x: the reference's error
    if kernel is None:
        return quant.quantize_int8(x, dim)
    x = x.contiguous()
    tokens, heads, channels = x.shape
    q = torch.empty(x.shape, dtype=torch.int8)
    per_row = dim != 0
    scale = torch.empty((tokens, heads, 1) if per_row else (1, heads, channels), dtype=torch.float32)
    rows, columns = (tokens * heads, channels) if per_row else (tokens, heads * channels)
    _check(kernel.quantize_int8(x.data_ptr(), _DTYPES[x.dtype], rows, columns, per_row, q.data_ptr(),
                                scale.data_ptr()))
    return q, scale


def dequantize_int8_kv(payloads: Sequence[tuple[torch.Tensor, ...]], shapes: Sequence[tuple[int, int, int]],
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """`kernels.quant.dequantize_int8_kv`, in one kernel call for a layer's payloads. ValueError where a payload is
    not its shape's (payloads come from other parties)."""
    kernel = _kernel() if payloads and dtype in _DTYPES and all(t.is_cpu for p in payloads for t in p) else None
    if kernel is None:
        return quant.dequantize_int8_kv(payloads, shapes, dtype)
    heads, channels = quant.check_int8_payloads(payloads, shapes)
    fields = []  # the kernel's Int8Source of each payload, one after another
    for (k, v, k_scale, v_scale), (tokens, *_) in zip(payloads, shapes):
        fields += k.data_ptr(), v.data_ptr(), k_scale.data_ptr(), v_scale.data_ptr(), tokens
    return _decoded(kernel.dequantize_int8_kv, fields, shapes, heads, channels, dtype)


def _decoded(decode, fields: list[int], shapes: Sequence[tuple[int, int, int]], heads: int, channels: int,
             dtype: torch.dtype, *arguments) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(K, V, whether every value is finite): K and V (sum of T, H, D) in `dtype`, filled by the kernel's `decode`
    from its sources' records (`fields`, one after another) and its `arguments`."""
    sources = array.array("q", fields)
    size = (sum(shape[0] for shape in shapes), heads, channels)
    k, v = torch.empty(size, dtype=dtype), torch.empty(size, dtype=dtype)
    status = decode(sources.buffer_info()[0], len(shapes), heads, channels, *arguments, k.data_ptr(), v.data_ptr(),
                    _DTYPES[dtype])
    _check(min(status, 0))
    return k, v, status == 0


def all_finite(tensor: torch.Tensor) -> bool:
    """`bool(torch.isfinite(tensor).all())`, in one C pass over float32 / bfloat16 / float16 CPU tensors (the torch
    ops take ~1.7 ns an element: most of a received payload's decode)."""
    kernel = _kernel() if tensor.dtype in _DTYPES and tensor.is_cpu else None
    if kernel is None:
        return bool(torch.isfinite(tensor).all())
    tensor = tensor.contiguous()
    return bool(kernel.all_finite(tensor.data_ptr(), tensor.numel(), _DTYPES[tensor.dtype]))


@functools.lru_cache(maxsize=4096)  # a layout per message size
def _parts(layout: quant.PayloadLayout) -> ctypes.Array:
    """The layout's part offsets as the kernel reads them (made once per layout)."""
    return (ctypes.c_int64 * len(layout.offsets))(*layout.offsets)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, key_bits: int, key_group: int, value_bits: int,
                value_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.quant.quantize_kv`: k and v (T, H, D) -> their payload (statistics float16 (1, H, S), codes uint8
    (1, H, C)), in one kernel call (a short message's cost is mostly per call)."""
    kernel = _kernel_for(k, key_bits, 0, key_group, k.dtype) if k.dim() == 3 and k.shape == v.shape \
        and k.dtype == v.dtype and v.device == k.device and value_bits in (2, 4, 8) and value_group >= 1 else None
    if kernel is None:
        return quant.quantize_kv(k, v, key_bits, key_group, value_bits, value_group)
    k, v = k.contiguous(), v.contiguous()
    tokens, heads, channels = k.shape
    layout = quant.payload_layout(tokens, channels, key_bits, key_group, value_bits, value_group)
    statistics = torch.empty(1, heads, layout.statistics, dtype=torch.float16)
    codes = torch.empty(1, heads, layout.codes, dtype=torch.uint8)
    _check(kernel.quantize_kv(k.data_ptr(), v.data_ptr(), _DTYPES[k.dtype], tokens, heads, channels, key_bits,
                              key_group, layout.shapes[0][1], value_bits, value_group, layout.shapes[3][1],
                              statistics.data_ptr(), layout.statistics, codes.data_ptr(), layout.codes,
                              _parts(layout)))
    return statistics, codes


def dequantize_kv(payloads: Sequence[tuple[torch.Tensor, ...]], shapes: Sequence[tuple[int, int, int]], key_bits: int,
                  key_group: int, value_bits: int, value_group: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """`kernels.quant.dequantize_kv`: (K, V, whether every decoded value is finite), K and V (sum of T, H, D) in
    `dtype`, the sources' tokens one after another, in one kernel call for all (a short message's cost is mostly per
    call). ValueError where a payload is not its shape's (payloads come from other parties)."""
    kernel = _kernel_for(payloads[0][0], key_bits, 0, key_group, dtype) if payloads and value_bits in (2, 4, 8) \
        and value_group >= 1 and all(len(p) == 2 and p[0].is_cpu and p[1].is_cpu for p in payloads) else None
    if kernel is None:
        return quant.dequantize_kv(payloads, shapes, key_bits, key_group, value_bits, value_group, dtype)
    heads, channels, layouts = quant.check_payloads(payloads, shapes, key_bits, key_group, value_bits, value_group)
    fields = []  # the kernel's Source of each payload, one after another
    for (statistics, codes), (tokens, *_), layout in zip(payloads, shapes, layouts):
        fields += statistics.data_ptr(), layout.statistics, codes.data_ptr(), layout.codes, tokens, *layout.offsets
    return _decoded(kernel.dequantize_kv, fields, shapes, heads, channels, dtype, key_bits, key_group,
                    layouts[0].shapes[0][1], value_bits, value_group, layouts[0].shapes[3][1])
