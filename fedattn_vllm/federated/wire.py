"""Wire format between engines and the coordinator: a msgpack header frame plus raw tensor frames.

Every message is a ZeroMQ multipart message [header, *tensors]. The header is a small
msgpack map (operation, session, participant, layer, credential, dtype, shape...); K and V
travel as their raw bytes in frames of their own: no JSON, no base64, no copies beyond the
socket's.
"""

from __future__ import annotations

import msgspec
import torch

KV = tuple[torch.Tensor, torch.Tensor]

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16)}
_encoder, _decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(dict)


class WireError(ValueError):
    """A message that does not follow the wire format."""


def encode(header: dict, kv: KV | None = None) -> list[bytes | memoryview]:
    """Frames of one message; with `kv`, the header gains its dtype and shape."""
    if kv is None:
        return [_encoder.encode(header)]
    k, v = (t.detach().contiguous().cpu() for t in kv)
    if k.shape != v.shape or k.dtype != v.dtype or k.dim() != 3:
        raise WireError(f"K and V must be (T, H_kv, D) of one dtype, got {tuple(k.shape)}, {tuple(v.shape)}")
    header = {**header, "dtype": str(k.dtype).removeprefix("torch."), "shape": list(k.shape)}
    return [_encoder.encode(header), *(memoryview(t.view(torch.uint8).numpy()).cast("B") for t in (k, v))]


def decode(frames: list) -> tuple[dict, KV | None]:
    """(header, K/V or None) of one message."""
    if not frames:
        raise WireError("empty message")
    try:
        header = _decoder.decode(frames[0])
    except msgspec.DecodeError as error:
        raise WireError(f"bad header: {error}") from None
    if len(frames) == 1:
        return header, None
    if len(frames) != 3 or header.get("dtype") not in _DTYPES or not isinstance(header.get("shape"), list):
        raise WireError("a K/V message has a header with dtype and shape, then exactly two tensor frames")
    dtype, shape = _DTYPES[header["dtype"]], tuple(header["shape"])
    expected = torch.Size(shape).numel() * dtype.itemsize
    tensors = []
    for frame in frames[1:]:
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        if len(buffer) != expected:
            raise WireError(f"tensor frame has {len(buffer)} bytes, header says {expected}")
        tensors.append(torch.frombuffer(bytearray(buffer), dtype=torch.uint8).view(dtype).view(shape))
    return header, (tensors[0], tensors[1])


def message_bytes(frames: list) -> int:
    return sum(len(f.buffer if hasattr(f, "buffer") else f) for f in frames)
