"""K/V sealed end to end between engines: a real coordinator relays and counts it, and cannot read or alter it."""

from __future__ import annotations

import threading

import pytest
import torch

from fedattn_vllm.config import FedAttnConfig, KVWire
from fedattn_vllm.exchange import KVExchangeError, PayloadKind
from fedattn_vllm.federated.client import NetworkKVExchange, SessionAdmin
from fedattn_vllm.federated.coordinator import Coordinator
from fedattn_vllm.federated.sealing import SessionSeal, new_seal_key
from fedattn_vllm.federated.wire import TAG_BYTES, SealedPayload, WireError, decode, encode
from fedattn_vllm.kv_wire import encode_kv

ADMIN_KEY = b"sealing-test-admin-key"


class MeddlingCoordinator(Coordinator):
    """The real coordinator, with a hook that may rewrite what it delivers ((session, source, layer) -> payload)."""

    meddle = None

    def _deliver(self, session, viewer, source, layer, kind):
        if self.meddle is not None:
            session.kv[source, layer, kind] = self.meddle(session, source, layer)
        return super()._deliver(session, viewer, source, layer, kind)


@pytest.fixture
def coordinator():
    server = MeddlingCoordinator("tcp://127.0.0.1:*", ADMIN_KEY)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=5)


def join(coordinator, session="s", keys=None, n=2, config=FedAttnConfig(sync_interval=1)):
    """n participants' exchanges (`config` over 4 layers); keys[i]: i's seal key (b"": a fresh shared one)."""
    shared, keys = new_seal_key(), keys or (b"",) * n
    credentials = SessionAdmin(coordinator.endpoint, ADMIN_KEY).open(session, config.resolve(4, n))
    engines = [NetworkKVExchange(coordinator.endpoint, wait_s=5.0) for _ in credentials]
    for n, (engine, credential) in enumerate(zip(engines, credentials)):
        engine.join(session, n, credential, seal_key=shared if keys[n] == b"" else keys[n])
    return engines


def payload(wire: KVWire = KVWire.NATIVE, tokens: int = 12):
    g = torch.Generator().manual_seed(tokens)
    return encode_kv(tuple(torch.randn(tokens, 2, 64, generator=g).to(torch.bfloat16) for _ in range(2)), wire)


@pytest.mark.parametrize("wire", [KVWire.NATIVE, KVWire.INT8, KVWire.K4V2])
def test_sealed_k_v_arrive_exact_and_the_coordinator_holds_only_ciphertext(coordinator, wire):
    engines = join(coordinator)
    sent = payload(wire)
    engines[0].publish("s", 0, 1, sent)
    received = engines[1].fetch("s", 1, 0, 1)
    assert len(received) == len(sent)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(sent, received))
    stored = coordinator.sessions["s"].kv[0, 1, PayloadKind.KV]
    assert isinstance(stored, SealedPayload) and len(stored.specs) == len(sent)
    held = bytes(stored.frame)
    for tensor in sent:
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        assert raw[:32] not in held and raw[-32:] not in held
    up = coordinator.sessions["s"].payload_bytes[0, "up"]
    assert up == sum(t.nbytes for t in sent) == engines[0].stats("s").published_bytes[0]  # the cost model's bytes
    assert coordinator.sessions["s"].wire_bytes[0, "up"] - up < 300 + TAG_BYTES  # one tag for the whole payload


@pytest.mark.parametrize("meddling", ["a flipped bit", "another layer's payload", "another participant's payload",
                                      "its questions", "unsealed"])
def test_a_relay_that_alters_swaps_or_unseals_k_v_is_caught(coordinator, meddling):
    engines = join(coordinator, n=3, config=FedAttnConfig(sync_interval=1, kv_share_ratio=0.5, kv_selection="question",
                                                         generators=[0, 2]))
    engines[0].publish("s", 0, 0, payload(tokens=5))
    engines[0].publish("s", 0, 2, payload(tokens=5))
    engines[0].publish("s", 0, 0, payload(tokens=5)[:1], PayloadKind.QUESTIONS)  # generator 0 asks 1 and 2
    engines[1].publish("s", 1, 0, payload(tokens=5))

    def meddle(session, source, layer):
        sealed = session.kv[source, layer, PayloadKind.KV]
        if meddling == "a flipped bit":
            frame = bytearray(sealed.frame)
            frame[700] ^= 1
            return SealedPayload(sealed.specs, bytes(frame))
        if meddling == "another layer's payload":
            return session.kv[source, 2, PayloadKind.KV]
        if meddling == "another participant's payload":
            return session.kv[1, layer, PayloadKind.KV]
        if meddling == "its questions":
            return session.kv[source, layer, PayloadKind.QUESTIONS]
        return payload(tokens=5)

    coordinator.meddle = meddle
    with pytest.raises(KVExchangeError, match="failed authentication" if meddling != "unsealed" else "unsealed"):
        engines[2].fetch("s", 2, 0, 0)


def test_a_slot_is_sealed_once():
    seal = SessionSeal(new_seal_key(), "s")
    seal.seal(0, 3, payload())
    with pytest.raises(KVExchangeError, match="sealed already"):
        seal.seal(0, 3, payload(tokens=4))


def test_a_participant_without_the_session_key_reads_nothing(coordinator):
    engines = join(coordinator, keys=(new_seal_key(), new_seal_key()))
    engines[0].publish("s", 0, 0, payload())
    with pytest.raises(KVExchangeError, match="failed authentication"):
        engines[1].fetch("s", 1, 0, 0)
    engines = join(coordinator, "t", keys=(new_seal_key(), None))
    engines[0].publish("t", 0, 0, payload())
    with pytest.raises(KVExchangeError, match="without a seal key"):
        engines[1].fetch("t", 1, 0, 0)


def test_sealed_frames_of_the_wrong_size_are_malformed():
    sealed = SessionSeal(new_seal_key(), "s").seal(0, 0, payload(tokens=3))
    frames = encode({"ok": True}, sealed)
    header, back = decode(frames)
    assert header["sealed"] is True and back.specs == sealed.specs
    assert len(frames) == 2  # one frame for every tensor
    with pytest.raises(WireError, match="sealed"):
        decode([frames[0], bytes(frames[1])[:-1]])
    with pytest.raises(WireError, match="one frame"):
        decode([frames[0], frames[1], frames[1]])
    with pytest.raises(ValueError, match="32 bytes"):
        SessionSeal(b"short", "s")
