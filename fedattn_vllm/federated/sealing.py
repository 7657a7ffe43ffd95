"""K/V sealed end to end between a session's engines: the coordinator relays ciphertext it cannot read.

The orchestrator draws a fresh key per session and hands it to each engine of the session
with its `submit` (over the CURVE-encrypted control link); the coordinator never receives
it. A published payload's tensors are sealed together, back to back, with ChaCha20-Poly1305
(one frame, one 16-byte tag): the nonce is derived from (participant, layer, kind), which a
session seals once each (a participant publishes a layer's K/V, or questions, once), and the
associated data binds the session, participant, layer, kind and the tensors' declared dtypes
and shapes, so a relay that alters, swaps or replays payloads across layers, participants,
kinds or sessions is caught by the receiver. What the coordinator still learns: each tensor's dtype and shape (hence the
segment lengths), and timing.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedattn_vllm.exchange import KVExchangeError, PayloadKind
from fedattn_vllm.federated.wire import SealedPayload, Tensors, spec_bytes, tensor_frames, tensor_from_frame, tensor_spec

KEY_BYTES = 32
_KIND_NONCE = {PayloadKind.KV: 0, PayloadKind.QUESTIONS: 1}


class SessionSeal:
    """Seals and opens one session's K/V payloads with the session's key."""

    def __init__(self, key: bytes, session: str):
        if len(key) != KEY_BYTES:
            raise ValueError(f"seal_key: {KEY_BYTES} bytes, got {len(key)}")
        self._aead = ChaCha20Poly1305(key)
        self._session = session
        self._sealed: set[tuple[int, int, PayloadKind]] = set()  # (participant, layer, kind): each nonce used once

    def _nonce_and_context(self, participant: int, layer: int, kind: PayloadKind, specs) -> tuple[bytes, bytes]:
        shapes = ";".join(f"{dtype}{list(shape)}" for dtype, shape in specs)
        return (struct.pack("<III", participant, layer, _KIND_NONCE[kind]),
                f"fedattn-{kind.value}|{self._session}|{participant}|{layer}|{shapes}".encode())

    def seal(self, participant: int, layer: int, tensors: Tensors, kind: PayloadKind = PayloadKind.KV) -> SealedPayload:
        if (participant, layer, kind) in self._sealed:  # a second payload under the same nonce would leak both
            raise KVExchangeError(f"participant {participant}'s {kind.noun} at layer {layer} were sealed already")
        self._sealed.add((participant, layer, kind))
        specs = tuple(tensor_spec(t) for t in tensors)
        nonce, context = self._nonce_and_context(participant, layer, kind, specs)
        return SealedPayload(specs, self._aead.encrypt(nonce, b"".join(tensor_frames(tensors)), context))

    def open(self, participant: int, layer: int, payload, kind: PayloadKind = PayloadKind.KV) -> Tensors:
        """The tensors of `participant`'s sealed payload of `kind` at `layer`; KVExchangeError if not sealed with
        this session's key for exactly that slot."""
        what = f"participant {participant}'s {kind.noun} at layer {layer}"
        if not isinstance(payload, SealedPayload):
            raise KVExchangeError(f"{what} arrived unsealed in a sealed session")
        nonce, context = self._nonce_and_context(participant, layer, kind, payload.specs)
        try:
            plain = memoryview(self._aead.decrypt(nonce, bytes(payload.frame), context))
        except InvalidTag:
            raise KVExchangeError(f"{what} failed authentication (altered, or sealed for another slot)") from None
        tensors, offset = [], 0
        for spec in payload.specs:
            size = spec_bytes(spec)
            tensors.append(tensor_from_frame(spec, plain[offset:offset + size]))
            offset += size
        return tuple(tensors)


def new_seal_key() -> bytes:
    return ChaCha20Poly1305.generate_key()
