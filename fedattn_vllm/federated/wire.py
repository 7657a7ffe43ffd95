"""Wire format between engines and the coordinator: a msgpack header frame plus raw tensor frames.

Every message is a ZeroMQ multipart message [header, *tensors]. The header is a small
msgpack map (operation, session, participant, layer, credential, and each tensor's dtype
and shape); K and V (or their quantised encoding and scales) travel as their raw bytes in frames
of their own: no JSON, no base64, no copies beyond the socket's. A receiver decodes the
header into its typed message (messages.py) under a size cap, before anything else.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

import msgspec
import torch

from fedattn_vllm.federated.messages import TensorSpec, TensorSpecs, WIRE_DTYPES

Tensors = tuple[torch.Tensor, ...]  # K and V, or an encoding of them (e.g. quantised K and V codes and their scales)

_DTYPES = {name: getattr(torch, name) for name in WIRE_DTYPES}
_encoder = msgspec.msgpack.Encoder()
MAX_HEADER_BYTES = 64 << 10  # a coordinator request or reply; an engine's submit (segments) allows more


class WireError(ValueError):
    """A message that does not follow the wire format."""


class Dropped(Counter):
    """Messages a receiver dropped unanswered, by reason; logged at doubling counts, so a flood stays quiet."""

    def __init__(self, receiver: str):
        super().__init__()
        self._log = logging.getLogger(receiver)

    def drop(self, reason: str, detail: str) -> None:
        self[reason] += 1
        total = sum(self.values())
        if total & (total - 1) == 0:
            self._log.warning("dropped a %s message (%s); %d dropped so far", reason, detail[:200], total)


def encode(header: dict, tensors: Tensors | None = None) -> list[bytes | memoryview]:
    """Frames of one message; with `tensors`, the header gains each one's dtype and shape."""
    if tensors is None:
        return [_encoder.encode(header)]
    tensors = tuple(t.detach().contiguous().cpu() for t in tensors)
    if not tensors or any(t.dtype not in _DTYPES.values() or t.numel() == 0 for t in tensors):
        raise WireError(f"tensors must be non-empty, of a wire dtype ({', '.join(_DTYPES)})")
    header = {**header, "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors]}
    return [_encoder.encode(header), *(memoryview(t.view(torch.uint8).numpy()).cast("B") for t in tensors)]


@functools.cache
def _decoder(into: type) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(into)


def decode(frames: list, into: type = dict, *, max_header_bytes: int = MAX_HEADER_BYTES):
    """(header as `into`, tensors or None) of one message; WireError if anything is malformed.

    `into`: a message type of messages.py (or a union of them), or dict for a reply.
    """
    if not frames:
        raise WireError("empty message")
    if len(frames) > 1 + 8:
        raise WireError(f"{len(frames)} frames (a header and at most 8 tensors)")
    head = _buffer(frames[0])
    if len(head) > max_header_bytes:
        raise WireError(f"header of {len(head)} bytes exceeds {max_header_bytes}")
    try:
        header = _decoder(into).decode(head)
    except msgspec.DecodeError as error:
        raise WireError(f"bad header: {error}") from None
    specs = header.get("tensors") if isinstance(header, dict) else getattr(header, "tensors", None)
    if len(frames) == 1:
        if specs is not None:
            raise WireError("the header lists tensors the message does not carry")
        return header, None
    try:
        specs = msgspec.convert(specs, TensorSpecs) if isinstance(header, dict) else specs
    except msgspec.ValidationError as error:
        raise WireError(f"bad tensor specs: {error}") from None
    if specs is None or len(specs) != len(frames) - 1:
        raise WireError("a tensor message lists each tensor frame's dtype and shape in its header")
    return header, tuple(_tensor(spec, frame) for spec, frame in zip(specs, frames[1:]))


def _tensor(spec: TensorSpec, frame) -> torch.Tensor:
    dtype, shape = _DTYPES[spec[0]], tuple(spec[1])
    buffer = _buffer(frame)
    if len(buffer) != torch.Size(shape).numel() * dtype.itemsize:
        raise WireError(f"tensor frame has {len(buffer)} bytes, header says {shape} {spec[0]}")
    return torch.frombuffer(bytearray(buffer), dtype=torch.uint8).view(dtype).view(shape)


def _buffer(frame):
    return frame.buffer if hasattr(frame, "buffer") else frame


def message_bytes(frames: list) -> int:
    return sum(len(_buffer(f)) for f in frames)
