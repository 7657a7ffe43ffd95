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
import math
from collections import Counter
from dataclasses import dataclass

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


TAG_BYTES = 16  # a sealed payload's authentication tag (sealing.py)


@dataclass(frozen=True)
class SealedPayload:
    """A payload's tensors sealed together by their session's key (sealing.py): relayed, counted, never read."""

    specs: tuple[TensorSpec, ...]  # each tensor's dtype and shape before sealing
    frame: bytes | memoryview  # the tensors' bytes back to back, encrypted, and the tag

    @property
    def payload_bytes(self) -> int:
        """The tensors' own bytes (what the cost model counts)."""
        return sum(spec_bytes(spec) for spec in self.specs)


WirePayload = Tensors | SealedPayload  # what a publish or a fetch's reply carries


def payload_nbytes(payload: WirePayload) -> int:
    """The tensors' own bytes, sealed or not (what the cost model counts)."""
    if isinstance(payload, SealedPayload):
        return payload.payload_bytes
    return sum(t.numel() * t.element_size() for t in payload)


def tensor_spec(tensor: torch.Tensor) -> TensorSpec:
    return str(tensor.dtype).removeprefix("torch."), list(tensor.shape)


def tensor_frames(tensors: Tensors) -> list[memoryview]:
    """Each tensor's raw bytes (no copy of a contiguous CPU tensor)."""
    tensors = tuple(t.detach().contiguous().cpu() for t in tensors)
    if not tensors or any(t.dtype not in _DTYPES.values() or t.numel() == 0 for t in tensors):
        raise WireError(f"tensors must be non-empty, of a wire dtype ({', '.join(_DTYPES)})")
    return [memoryview(t.view(torch.uint8).numpy()).cast("B") for t in tensors]


def encode(header: dict, payload: WirePayload | None = None) -> list[bytes | memoryview]:
    """Frames of one message; with a payload, the header gains each tensor's dtype and shape (and `sealed`)."""
    if payload is None:
        return [_encoder.encode(header)]
    if isinstance(payload, SealedPayload):
        return [_encoder.encode({**header, "tensors": [list(s) for s in payload.specs], "sealed": True}),
                payload.frame]
    frames = tensor_frames(payload)
    return [_encoder.encode({**header, "tensors": [tensor_spec(t) for t in payload]}), *frames]


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
    field = header.get if isinstance(header, dict) else functools.partial(getattr, header)
    specs, sealed = field("tensors", None), field("sealed", False) is True
    if len(frames) == 1:
        if specs is not None:
            raise WireError("the header lists tensors the message does not carry")
        return header, None
    try:
        specs = msgspec.convert(specs, TensorSpecs) if isinstance(header, dict) else specs
    except msgspec.ValidationError as error:
        raise WireError(f"bad tensor specs: {error}") from None
    if specs is None or len(frames) != 1 + (1 if sealed else len(specs)):
        raise WireError("a tensor message lists each tensor's dtype and shape in its header, and carries one frame "
                        "per tensor (one for them all, sealed)")
    if sealed:
        frame = _buffer(frames[1])
        if len(frame) != sum(spec_bytes(s) for s in specs) + TAG_BYTES:
            raise WireError(f"a sealed frame of {len(frame)} bytes for tensors {specs}")
        return header, SealedPayload(tuple(tuple(s) for s in specs), frame)
    return header, tuple(tensor_from_frame(spec, frame) for spec, frame in zip(specs, frames[1:]))


def tensor_from_frame(spec: TensorSpec, frame) -> torch.Tensor:
    """The tensor a frame of `spec`'s size holds (an owned copy); WireError if the size differs."""
    buffer = _buffer(frame)
    if len(buffer) != spec_bytes(spec):
        raise WireError(f"tensor frame has {len(buffer)} bytes, header says {tuple(spec[1])} {spec[0]}")
    return torch.frombuffer(bytearray(buffer), dtype=torch.uint8).view(_DTYPES[spec[0]]).view(tuple(spec[1]))


def spec_bytes(spec: TensorSpec) -> int:
    """A tensor's bytes from its declared dtype and shape (Python integers: a hostile shape cannot wrap)."""
    return math.prod(spec[1]) * _DTYPES[spec[0]].itemsize


def _buffer(frame):
    return frame.buffer if hasattr(frame, "buffer") else frame


def message_bytes(frames: list) -> int:
    return sum(len(_buffer(f)) for f in frames)
