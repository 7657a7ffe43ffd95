"""Hostile ZeroMQ traffic: malformed and unauthenticated frames are dropped and counted, never raised.

The coordinator runs in a thread here (its counters are read directly) and as a real
process (counters over its admin socket); after each barrage a real session still runs.
The engine's control socket gets the same treatment in tests/test_federated.py's cluster.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import torch
import zmq

from fedattn_vllm.config import FedAttnConfig, KVWire
from fedattn_vllm.exchange import KVExchangeError, kv_nbytes
from fedattn_vllm.federated import messages as m
from fedattn_vllm.federated.client import CoordinatorError, NetworkKVExchange, SessionAdmin
from fedattn_vllm.federated.coordinator import Coordinator
from fedattn_vllm.federated.wire import WireError, decode, encode
from fedattn_vllm.kv_wire import CODECS, LOW_BIT, decode_checked, encode_kv, payload_bytes, questions_checked
from kernels import native, quant

KEY = b"hostile-test-admin-key"
pack = msgspec.msgpack.encode


def kv(tokens: int):
    return tuple(torch.randn(tokens, 2, 8) for _ in range(2))


def hostile_messages(rng: random.Random, session: str, credential: bytes) -> list[list[bytes]]:
    """Random bytes, random msgpack, and crafted headers: wrong types, huge integers, forged keys, bad tensors."""
    crafted = [
        {"op": "open", "admin_key": 2**63, "session": "x", "config": {}, "num_layers": 2, "num_participants": 2},
        {"op": "open", "admin_key": 10**9},
        {"op": "open", "admin_key": b"wrong", "session": "x", "config": {}, "num_layers": 2, "num_participants": 2},
        {"op": "open", "admin_key": KEY, "session": "x", "config": {}, "num_layers": 10**12, "num_participants": 2},
        {"op": "open", "admin_key": KEY, "session": "x" * 10_000, "config": {}, "num_layers": 2, "num_participants": 2},
        {"op": "fetch", "session": session, "participant": 2**64 - 1, "source": 0, "layer": 0, "credential": credential},
        {"op": "fetch", "session": session, "participant": -1, "source": 0, "layer": 0, "credential": credential},
        {"op": "fetch", "session": session, "participant": 1, "source": 0, "layer": 0, "credential": b"forged" * 3},
        {"op": "fetch", "session": session, "participant": 1, "source": 0, "layer": 0, "credential": credential,
         "wait_s": float("nan")},
        {"op": "fetch", "session": session, "participant": 1, "source": 0, "layer": 0, "credential": credential,
         "wait_s": 1e300},
        {"op": "publish", "session": session, "participant": 0, "layer": 0, "credential": credential,
         "tensors": [["float32", [2**40, 2**40]]]},
        {"op": "publish", "session": session, "participant": 0, "layer": 0, "credential": credential,
         "tensors": [["complex128", [1]]]},
        {"op": "publish", "session": session, "participant": 0, "layer": 0, "credential": credential,
         "tensors": [["float32", [-4]]]},
        {"op": "publish", "session": session, "participant": 0, "layer": 0, "credential": credential,
         "tensors": [["float32", [1]]], "kind": "text"},
        {"op": "fetch", "session": session, "participant": 1, "source": 0, "layer": 0, "credential": credential,
         "kind": 1},
        {"op": "close", "admin_key": KEY, "session": session, "sneaky": True},
        {"op": "stats", "admin_key": [1, 2, 3], "session": session},
        {"op": "counters"},
        {"op": None}, {"op": "shutdown"}, {}, [], "open", 12, None,
    ]
    messages = [[pack(h)] for h in crafted]
    messages += [[pack(crafted[10]), b"\0" * 64]]  # a tensor frame that does not match its spec (a publish)
    messages += [[pack({"op": "publish"}), *(b"\0" for _ in range(12))]]  # too many frames
    messages += [[b"\x93" * (m.MAX_SIZE * 40)]]  # a header over the size cap
    for _ in range(200):
        kind = rng.randrange(3)
        if kind == 0:
            messages.append([rng.randbytes(rng.randrange(0, 300))])
        elif kind == 1:
            messages.append([pack(_random_value(rng, 3))])
        else:  # a real operation with one field replaced by junk
            header = dict(rng.choice(crafted[5:10]))  # the fetches
            header[rng.choice(list(header))] = _random_value(rng, 2)
            messages.append([pack(header), *(rng.randbytes(8) for _ in range(rng.randrange(2)))])
    return messages


def _random_value(rng: random.Random, depth: int):
    choices = [lambda: rng.randrange(-2**63, 2**64), lambda: rng.random() * 10 ** rng.randrange(-5, 300),
               lambda: rng.randbytes(rng.randrange(20)), lambda: "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(5)),
               lambda: None, lambda: rng.random() < 0.5]
    if depth:
        choices += [lambda: [_random_value(rng, depth - 1) for _ in range(rng.randrange(4))],
                    lambda: {str(rng.randrange(9)): _random_value(rng, depth - 1) for _ in range(rng.randrange(4))},
                    lambda: {"op": rng.choice(["open", "fetch", "publish", "stats"]), "x": _random_value(rng, depth - 1)}]
    return rng.choice(choices)()


def barrage(endpoint: str, messages: list[list[bytes]]) -> int:
    """Send every message from a raw DEALER socket; the number of replies that came back within a second."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        for i, frames in enumerate(messages):
            socket.send_multipart([i.to_bytes(8, "little"), *frames])
        replies = 0
        while socket.poll(1000):
            socket.recv_multipart()
            replies += 1
        return replies
    finally:
        socket.close(0)


def run_session(endpoint: str, name: str) -> None:
    """A real two-participant exchange: open, publish, a pipelined fetch of identical tensors, stats, close."""
    plan = FedAttnConfig(sync_interval=1).resolve(2, 2)
    admin = SessionAdmin(endpoint, KEY, timeout_s=10)
    credentials = admin.open(name, plan)
    engines = [NetworkKVExchange(endpoint, wait_s=5.0) for _ in credentials]
    for n, (engine, credential) in enumerate(zip(engines, credentials)):
        engine.join(name, n, credential)
    sent = kv(5)
    engines[0].publish(name, 0, 1, sent)
    received = engines[1].fetch(name, 1, 0, 1)
    assert len(received) == len(sent) and all(torch.equal(a, b) for a, b in zip(sent, received))
    assert admin.stats(name)["payload_bytes"]["up"][0] == sum(t.nbytes for t in sent)
    admin.close(name)


def test_typed_headers_refuse_what_crashed_the_coordinator():
    with pytest.raises(WireError, match="admin_key"):
        decode([pack({"op": "open", "admin_key": 2**63})], m.CoordinatorRequest)
    with pytest.raises(WireError, match="unknown field"):
        decode([pack({"op": "close", "admin_key": b"k", "session": "s", "extra": 1})], m.CoordinatorRequest)
    with pytest.raises(WireError, match="exceeds"):
        decode([b"\x80" * 70_000], m.CoordinatorRequest)
    with pytest.raises(WireError, match=">= 1"):
        decode([pack({"tensors": [["float32", [3, 0]]]}), b""])
    with pytest.raises(WireError, match="frames"):
        decode([pack({}), *([b"x"] * 9)])
    with pytest.raises(WireError, match="does not carry"):
        decode([pack({"op": "publish", "tensors": [["float32", [1]]]})])
    for wrapping in ([2**31, 2**31, 4], [2**31, 2**31, 2]):  # int64 element counts that wrap to 0 and to -2**63
        with pytest.raises(WireError, match="header says"):
            decode([pack({"tensors": [["float32", wrapping]]}), b""])
        with pytest.raises(WireError, match="sealed frame"):
            decode([pack({"tensors": [["float32", wrapping]], "sealed": True}), b"\0" * 16])
    header, tensors = decode(encode({"op": "fetch", "session": "s", "participant": 1, "source": 0, "layer": 3,
                                     "credential": b"c" * 16, "wait_s": 2.5}), m.CoordinatorRequest)
    assert isinstance(header, m.Fetch) and header.layer == 3 and tensors is None


@pytest.fixture
def coordinator():
    server = Coordinator("tcp://127.0.0.1:*", KEY)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, thread
    server.stop()
    thread.join(timeout=5)


def test_the_coordinator_drops_hostile_frames_and_keeps_serving(coordinator):
    server, thread = coordinator
    plan = FedAttnConfig(sync_interval=1).resolve(2, 2)
    credentials = SessionAdmin(server.endpoint, KEY).open("victim", plan)
    messages = hostile_messages(random.Random(0), "victim", credentials[1])
    replies = barrage(server.endpoint, messages)
    assert thread.is_alive()
    dropped = server.dropped["malformed"] + server.dropped["unauthenticated"]
    assert server.dropped["unauthenticated"] >= 2 and dropped + replies == len(messages)
    # Answered: only well-formed, authenticated requests (refusals included, e.g. a fetch of a layer nobody published).
    assert replies < 20 and "victim" in server.sessions and "x" not in server.sessions
    run_session(server.endpoint, "after")
    assert not server.sessions.keys() - {"victim"}


def test_a_coordinator_process_survives_a_barrage_and_counts_it(tmp_path):
    ready = tmp_path / "coordinator.ready"
    env = {**os.environ, "FEDATTN_ADMIN_KEY": KEY.decode()}
    process = subprocess.Popen([sys.executable, "-m", "fedattn_vllm.federated.coordinator", "--bind", "tcp://127.0.0.1:*",
                                "--ready-file", str(ready), "--parent-pid", str(os.getpid()), "--max-frame-mib", "1",
                                "--insecure"],  # the barrage is an insider's: what gets past CURVE (test_curve.py)
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        endpoint = ready.read_text()
        messages = hostile_messages(random.Random(1), "nobody", b"c" * 16)
        barrage(endpoint, messages + [[pack({"op": "publish"}), b"\0" * (2 << 20)]])  # a frame over the cap
        assert process.poll() is None
        counters = SessionAdmin(endpoint, KEY).counters()
        assert sum(counters["dropped"].values()) >= len(messages) - 20 and counters["sessions"] == 0
        run_session(endpoint, "after")
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_k_v_held_at_the_coordinator_is_bounded_and_freed_with_its_session():
    server = Coordinator("tcp://127.0.0.1:*", KEY, max_stored_bytes=3 * 2 * 5 * 2 * 8 * 4)  # three K/V payloads
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        plan = FedAttnConfig(sync_interval=1).resolve(4, 2)
        admin = SessionAdmin(server.endpoint, KEY)
        credentials = admin.open("big", plan)
        engine = NetworkKVExchange(server.endpoint)
        engine.join("big", 0, credentials[0])
        for layer in range(3):
            engine.publish("big", 0, layer, kv(5))
        with pytest.raises(CoordinatorError) as busy:  # an authenticated publisher cannot exhaust memory
            engine.publish("big", 0, 3, kv(5))
        assert busy.value.code == "busy" and admin.counters()["stored_bytes"] == server.max_stored_bytes
        admin.close("big")
        assert admin.counters()["stored_bytes"] == 0
        run_session(server.endpoint, "after")
    finally:
        server.stop()
        thread.join(timeout=5)


def test_open_sessions_at_the_coordinator_are_capped_and_a_closed_one_frees_its_place():
    server = Coordinator("tcp://127.0.0.1:*", KEY, max_sessions=3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        plan = FedAttnConfig(sync_interval=1).resolve(4, 2)
        admin = SessionAdmin(server.endpoint, KEY)
        for n in range(3):
            admin.open(f"s{n}", plan)
        with pytest.raises(CoordinatorError) as busy:  # an admin-key holder cannot exhaust memory either
            admin.open("s3", plan)
        assert busy.value.code == "busy" and admin.counters()["sessions"] == 3
        admin.close("s0")
        run_session(server.endpoint, "after")
    finally:
        server.stop()
        thread.join(timeout=5)


def test_payloads_from_another_party_are_checked_before_they_are_used():
    """What another engine sent (through an honest relay) is refused unless it is exactly what the plan says it
    carries: K/V that decode to the expected shape, finite; question queries as one finite (rows, H, D) tensor."""
    shape = (5, 2, 8)
    exact = encode_kv(kv(5), KVWire.NATIVE)
    [decoded] = decode_checked([exact], KVWire.NATIVE, torch.float32, [shape])
    assert all(torch.equal(a, b) for a, b in zip(decoded, exact, strict=True))
    nan = (exact[0].clone().fill_(float("nan")), exact[1])
    for payload, wire in ((exact, KVWire.INT8), (encode_kv(kv(4), KVWire.NATIVE), KVWire.NATIVE),
                          (nan, KVWire.NATIVE), (encode_kv(kv(4), KVWire.K4V2), KVWire.K4V2)):
        with pytest.raises(KVExchangeError):
            decode_checked([payload], wire, torch.float32, [shape])
    questions = torch.randn(*shape)
    assert torch.equal(questions_checked((questions,), torch.float32, shape), questions)
    for payload in ((questions, questions), (questions[:4],), (questions.double(),), (questions / 0,), ()):
        with pytest.raises(KVExchangeError, match="question queries"):
            questions_checked(payload, torch.float32, shape)


@pytest.mark.parametrize("wire", [KVWire.NATIVE, KVWire.INT8, KVWire.K4V2])
def test_a_layers_payloads_decode_to_its_sources_tokens_in_order_and_one_bad_one_refuses_them_all(wire):
    """Encoded payloads decode in one call into one part, each source's tokens what it decodes to alone; exact ones
    one part a source (not copied). Any source's payload failing its check refuses the layer."""
    shapes = [(5, 2, 8), (1, 2, 8), (3, 2, 8)]
    payloads = [encode_kv(kv(shape[0]), wire) for shape in shapes]
    parts = decode_checked(payloads, wire, torch.float32, shapes)
    alone = [decode_checked([payload], wire, torch.float32, [shape]) for payload, shape in zip(payloads, shapes)]
    assert len(parts) == (1 if wire in CODECS else 3)
    for got, want in zip(map(torch.cat, zip(*parts)), map(torch.cat, zip(*(p for a in alone for p in a)))):
        assert torch.equal(got, want)
    if wire is KVWire.NATIVE:
        assert all(k is payload[0] and v is payload[1] for (k, v), payload in zip(parts, payloads))
    short = [*payloads[:2], encode_kv(kv(4), wire)]  # a source that sent fewer tokens than its plan says
    with pytest.raises(KVExchangeError, match={KVWire.NATIVE: "bytes", KVWire.INT8: "an int8 payload"}.get(
            wire, "statistics and uint8")):
        decode_checked(short, wire, torch.float32, shapes)
    nan = [payloads[0], tuple(t.clone() for t in payloads[1]), payloads[2]]  # the right size, a NaN within
    next(t for t in nan[1] if t.is_floating_point()).view(-1)[0] = float("nan")  # K, a scale, a statistic
    with pytest.raises(KVExchangeError, match="finite"):
        decode_checked(nan, wire, torch.float32, shapes)


@pytest.mark.parametrize("on_the_reference", [False, True], ids=["C kernel", "torch reference"])
@pytest.mark.parametrize("lie", ["swapped", "codes as statistics", "heads folded", "NaN scales", "infinite minima"])
def test_low_bit_payloads_of_the_right_size_that_lie_about_their_layout_are_refused(lie, on_the_reference):
    """They pass the byte count, so the decoder itself must check both tensors before its kernel reads a byte, and
    the finite check catch what decodes; on the C kernel and on the torch reference alike."""
    shape = (5, 2, 8)
    statistics, codes = encode_kv(kv(5), KVWire.K4V2)
    _, k_scale, k_low, *_ = quant.split_payload((statistics, codes), LOW_BIT[KVWire.K4V2].layout(5, 8))
    if lie == "NaN scales":
        k_scale.fill_(float("nan"))  # views of the statistics
    elif lie == "infinite minima":
        k_low.fill_(float("-inf"))
    lying = {"swapped": (codes, statistics), "codes as statistics": (codes.view(torch.float16), statistics.view(
        torch.uint8)), "heads folded": (statistics.view(1, 1, -1), codes.view(1, 1, -1))}.get(lie, (statistics, codes))
    assert kv_nbytes(lying) == payload_bytes(KVWire.K4V2, *shape, 4)
    with pytest.raises(KVExchangeError), native.reference_only() if on_the_reference else contextlib.nullcontext():
        decode_checked([lying], KVWire.K4V2, torch.float32, [shape])
