"""Wire format between engines and the coordinator: a msgpack header frame plus raw tensor frames.

Every message is a ZeroMQ multipart message [header, *tensors]. The header is a small
msgpack map (operation, session, participant, layer, credential, and each tensor's dtype
and shape); K and V (or their quantised encoding and scales) travel as their raw bytes in frames
of their own: no JSON, no base64, no copies beyond the socket's.
"""

from __future__ import annotations

import msgspec
import torch

Tensors = tuple[torch.Tensor, ...]  # K and V, or an encoding of them (e.g. quantised K and V codes and their scales)

_DTYPES = {str(d).removeprefix("torch."): d
           for d in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8)}
_encoder, _decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(dict)


class WireError(ValueError):
    """A message that does not follow the wire format."""


def encode(header: dict, tensors: Tensors | None = None) -> list[bytes | memoryview]:
    """Frames of one message; with `tensors`, the header gains each one's dtype and shape."""
    if tensors is None:
        return [_encoder.encode(header)]
    tensors = tuple(t.detach().contiguous().cpu() for t in tensors)
    if not tensors or any(t.dtype not in _DTYPES.values() or t.numel() == 0 for t in tensors):
        raise WireError(f"tensors must be non-empty, of a wire dtype ({', '.join(_DTYPES)})")
    header = {**header, "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors]}
    return [_encoder.encode(header), *(memoryview(t.view(torch.uint8).numpy()).cast("B") for t in tensors)]


def decode(frames: list) -> tuple[dict, Tensors | None]:
    """(header, tensors or None) of one message."""
    if not frames:
        raise WireError("empty message")
    try:
        header = _decoder.decode(frames[0])
    except msgspec.DecodeError as error:
        raise WireError(f"bad header: {error}") from None
    if len(frames) == 1:
        return header, None
    specs = header.get("tensors")
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise WireError("a tensor message lists each tensor frame's dtype and shape in its header")
    tensors = []
    for spec, frame in zip(specs, frames[1:]):
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in _DTYPES and isinstance(spec[1], list)):
            raise WireError(f"bad tensor spec {spec!r}")
        dtype, shape = _DTYPES[spec[0]], tuple(spec[1])
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        if len(buffer) != torch.Size(shape).numel() * dtype.itemsize or not len(buffer):
            raise WireError(f"tensor frame has {len(buffer)} bytes, header says {shape} {spec[0]}")
        tensors.append(torch.frombuffer(bytearray(buffer), dtype=torch.uint8).view(dtype).view(shape))
    return header, tuple(tensors)


def message_bytes(frames: list) -> int:
    return sum(len(f.buffer if hasattr(f, "buffer") else f) for f in frames)
