"""The wire format and the coordinator over real ZeroMQ sockets on loopback."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import zmq

from fedattn_vllm.config import FedAttnConfig, KVWire
from fedattn_vllm.exchange import PayloadKind
from fedattn_vllm.federated import relay
from fedattn_vllm.federated.client import (CoordinatorConnection, CoordinatorError, NetworkKVExchange,
                                           ParticipantCalls, SessionAdmin)
from fedattn_vllm.federated.coordinator import Coordinator
from fedattn_vllm.federated.wire import WireError, decode, encode
from fedattn_vllm.kv_wire import encode_kv

KEY = b"test-admin-key"


def kv(tokens: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(tokens, 2, 64, generator=generator).to(dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wire_round_trip_is_bit_exact(dtype):
    header, back = decode(encode({"op": "publish", "layer": 4}, kv(7, dtype)))
    assert header["op"] == "publish" and header["tensors"] == [[str(dtype)[6:], [7, 2, 64]]] * 2
    assert len(back) == 2
    for a, b in zip(kv(7, dtype), back):
        assert torch.equal(a, b) and b.dtype == dtype


@pytest.mark.parametrize("wire", [KVWire.INT8, KVWire.INT4, KVWire.INT2])
def test_quantised_payloads_with_scales_round_trip(wire):
    payload = encode_kv(kv(5, torch.bfloat16), wire)
    _, back = decode(encode({"op": "publish"}, payload))
    assert [t.dtype for t in back] == [t.dtype for t in payload] and len(back) == (4 if wire is KVWire.INT8 else 2)
    assert all(torch.equal(a, b) for a, b in zip(payload, back))


def test_malformed_frames_are_wire_errors():
    frames = encode({"op": "publish"}, kv(3))
    with pytest.raises(WireError):
        decode([frames[0], frames[1]])  # V missing
    with pytest.raises(WireError):
        decode([frames[0], frames[1], bytes(10)])  # wrong size
    with pytest.raises(WireError):
        decode([b"\xc1 not msgpack"])


@pytest.fixture
def coordinator():
    server = Coordinator("tcp://127.0.0.1:*", KEY, session_ttl_s=600.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=5)


def open_session(coordinator, name="s", n=3, generators=(-1,), interval=2, generator_interval=None, **config):
    plan = FedAttnConfig(sync_interval=interval, generators=generators,  # sync layers 0, 2, 4
                         generator_sync_interval=generator_interval, **config).resolve(6, n)
    admin = SessionAdmin(coordinator.endpoint, KEY)
    credentials = admin.open(name, plan)
    engines = []
    for participant, credential in enumerate(credentials):
        exchange = NetworkKVExchange(coordinator.endpoint, wait_s=5.0)
        exchange.join(name, participant, credential)
        engines.append(exchange)
    return admin, engines


def test_pipelined_fetch_waits_for_the_publish_and_gets_identical_tensors(coordinator):
    admin, engines = open_session(coordinator)
    sent = kv(100)
    publisher = threading.Timer(0.3, engines[0].publish, args=("s", 0, 2, sent))
    publisher.start()
    started = time.monotonic()
    received = engines[1].fetch("s", 1, 0, 2)
    assert time.monotonic() - started >= 0.25
    assert len(received) == len(sent) and all(torch.equal(a, b) for a, b in zip(sent, received))
    stats = admin.stats("s")
    payload = sum(t.nbytes for t in sent)
    assert stats["payload_bytes"]["up"][0] == payload == stats["payload_bytes"]["down"][1]
    overhead = stats["wire_bytes"]["up"][0] - payload
    print(f"\nframing overhead for 100 tokens fp32: {overhead} B ({overhead / payload:.3%})")
    assert 0 < overhead < 0.01 * payload
    publisher.join()  # its own count is made after the coordinator's answer, which the fetch may beat
    assert engines[0].stats("s").published_bytes[0] == payload == engines[1].stats("s").received_bytes[1]


def test_visibility_credentials_and_layers_are_enforced(coordinator):
    _, engines = open_session(coordinator, generators=(2,))
    engines[1].publish("s", 1, 0, kv(4))
    with pytest.raises(CoordinatorError, match="may not see") as refused:
        engines[0].fetch("s", 0, 1, 0)  # a later participant, and 0 does not generate
    assert refused.value.code == "forbidden"
    assert engines[2].fetch("s", 2, 1, 0)[0].shape == (4, 2, 64)  # the generator sees everyone
    with pytest.raises(CoordinatorError, match="does not share K/V at layer 1"):
        engines[1].publish("s", 1, 1, kv(4))
    with pytest.raises(CoordinatorError) as duplicate:
        engines[1].publish("s", 1, 0, kv(4))
    assert duplicate.value.code == "conflict"
    forged = {"op": "fetch", "session": "s", "participant": 2, "source": 1, "layer": 0, "credential": b"x" * 16}
    with pytest.raises(CoordinatorError) as unanswered:  # a forged credential: dropped unanswered, counted
        CoordinatorConnection(coordinator.endpoint).call(forged, timeout_s=0.5)
    assert unanswered.value.code == "unreachable" and coordinator.dropped["unauthenticated"] == 1


def test_a_missing_peer_times_out_and_the_coordinator_keeps_serving(coordinator):
    _, engines = open_session(coordinator)
    engines[2].wait_s = 0.3
    with pytest.raises(CoordinatorError) as late:
        engines[2].fetch("s", 2, 0, 0)
    assert late.value.code == "timeout"
    engines[0].publish("s", 0, 0, kv(2))
    assert engines[1].fetch("s", 1, 0, 0)[0].shape == (2, 2, 64)


def test_closing_frees_the_session_and_fails_its_waiters(coordinator):
    admin, engines = open_session(coordinator)
    engines[0].publish("s", 0, 0, kv(8))
    threading.Timer(0.2, admin.close, args=("s",)).start()
    with pytest.raises(CoordinatorError) as closed:
        engines[2].fetch("s", 2, 1, 0)  # waits; the session closes under it
    assert closed.value.code == "unknown_session"
    assert "s" not in coordinator.sessions


def held_session(coordinator, name: str):
    """A two-participant session and each participant's own calls, `leave(n, wait_s)` and `alive(n)`."""
    credentials = SessionAdmin(coordinator.endpoint, KEY).open(name, FedAttnConfig(sync_interval=2).resolve(6, 2))
    connections = [CoordinatorConnection(coordinator.endpoint) for _ in credentials]

    def call(n: int, **fields):
        return connections[n].call({"session": name, "participant": n, "credential": credentials[n], **fields})[0]

    return (lambda n, wait_s: call(n, op="leave", wait_s=wait_s)), (lambda n: call(n, op="alive"))


def test_a_participant_done_waits_on_while_the_others_say_they_are_computing(coordinator):
    leave, alive = held_session(coordinator, "held")
    alive(1)
    with pytest.raises(CoordinatorError) as pending:
        leave(0, 0.3)  # 1 is computing (it said so): 0 is told to wait on, and the session stays
    assert pending.value.code == "pending" and "held" in coordinator.sessions
    with ThreadPoolExecutor(1) as pool:  # 0 leaves again, 1 finishes: both answered with every participant's bytes
        first = pool.submit(leave, 0, 5.0)
        time.sleep(0.2)
        assert set(leave(1, 5.0)["payload_bytes"]) == {"up", "down"}
        assert set(first.result()["payload_bytes"]) == {"up", "down"}
    assert "held" not in coordinator.sessions


def test_a_participant_done_stops_waiting_for_one_that_fell_silent(coordinator, monkeypatch):
    monkeypatch.setattr(relay, "LIVENESS_S", 0.1)
    leave, alive = held_session(coordinator, "quiet")
    alive(1)
    time.sleep(0.3)  # 1 says nothing more (its site died)
    with pytest.raises(CoordinatorError, match=r"participants \[1\] did not finish") as gone:
        leave(0, 0.3)
    assert gone.value.code == "timeout"


def test_a_call_the_coordinator_never_answers_is_reported_overdue(monkeypatch):
    monkeypatch.setattr(ParticipantCalls, "ANSWER_MARGIN_S", 0.1)
    silent = zmq.Context.instance().socket(zmq.ROUTER)  # takes every call, answers none (a restarted coordinator)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    calls = ParticipantCalls(f"tcp://127.0.0.1:{port}", curve=None)
    try:
        calls.announce("s", 0, length=5, prefix_len=0, terms=b"", wait_s=0.1)
        calls.alive("t", 1)
        assert calls.overdue() == [] and calls.outstanding("announce", "s")
        time.sleep(0.4)
        assert sorted(calls.overdue()) == [("alive", "t"), ("announce", "s")] and calls.overdue() == []
    finally:
        calls.close()
        silent.close(0)


def test_idle_sessions_expire():
    server = Coordinator("tcp://127.0.0.1:*", KEY, session_ttl_s=0.3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        open_session(server)
        time.sleep(0.6)
        assert server.sessions == {}
    finally:
        server.stop()
        thread.join(timeout=5)


def test_generator_layers_are_readable_by_the_generators_only(coordinator):
    _, engines = open_session(coordinator, generators=(2,), generator_interval=1)
    engines[0].publish("s", 0, 1, kv(3))  # layer 1: a generator layer, not a sync layer
    with pytest.raises(CoordinatorError, match="may not see") as refused:
        engines[1].fetch("s", 1, 0, 1)  # participant 1 does not generate: it reads only at 0, 2, 4
    assert refused.value.code == "forbidden"
    assert engines[2].fetch("s", 2, 0, 1)[0].shape == (3, 2, 64)
    with pytest.raises(CoordinatorError, match="does not share K/V at layer 1"):
        engines[2].publish("s", 2, 1, kv(3))  # nobody else generates: nobody would read it


def test_question_queries_go_from_the_generators_to_the_publishers_that_choose_by_them(coordinator):
    """Question selection: a generator's questions at a sync layer reach every other publisher, nobody else; a
    fetch of questions not yet sent waits for them, like K/V."""
    _, engines = open_session(coordinator, generators=(0, 2), kv_share_ratio=0.5, kv_selection="question")
    questions = kv(4)[:1]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(engines[1].fetch, "s", 1, 2, 2, PayloadKind.QUESTIONS)
        time.sleep(0.2)
        engines[2].publish("s", 2, 2, questions, PayloadKind.QUESTIONS)
        assert torch.equal(waiting.result(timeout=5)[0], questions[0])
    assert torch.equal(engines[0].fetch("s", 0, 2, 2, PayloadKind.QUESTIONS)[0], questions[0])
    for viewer, source, layer in ((2, 2, 2), (0, 1, 2), (0, 2, 1)):  # its own; not a generator's; not a sync layer
        with pytest.raises(CoordinatorError, match="may not see") as refused:
            engines[viewer].fetch("s", viewer, source, layer, PayloadKind.QUESTIONS)
        assert refused.value.code == "forbidden"
    for publisher, layer in ((1, 2), (2, 3)):  # not a generator; not a sync layer
        with pytest.raises(CoordinatorError, match="does not share question queries") as refused:
            engines[publisher].publish("s", publisher, layer, questions, PayloadKind.QUESTIONS)
        assert refused.value.code == "forbidden"
    with pytest.raises(CoordinatorError, match="already published question queries"):
        engines[2].publish("s", 2, 2, questions, PayloadKind.QUESTIONS)
    engines[2].publish("s", 2, 2, kv(4))  # the same slot's K/V is another payload
    assert engines[0].fetch("s", 0, 2, 2)[0].shape == (4, 2, 64)


def test_a_participant_that_shares_every_token_never_receives_the_questions(coordinator):
    _, engines = open_session(coordinator, generators=(2,), kv_share_ratio=(1.0, 0.5, 0.5), kv_selection="question")
    engines[2].publish("s", 2, 0, kv(4)[:1], PayloadKind.QUESTIONS)
    assert engines[1].fetch("s", 1, 2, 0, PayloadKind.QUESTIONS)[0].shape == (4, 2, 64)
    with pytest.raises(CoordinatorError, match="may not see") as refused:
        engines[0].fetch("s", 0, 2, 0, PayloadKind.QUESTIONS)  # it chooses nothing: the question is not its to see
    assert refused.value.code == "forbidden"


@pytest.mark.parametrize("header,answer", [
    ({"config": {"sync_interval": 0}, "num_layers": 6, "num_participants": 2}, "bad_request"),
    ({"config": {"bogus": 1}, "num_layers": 6, "num_participants": 2}, "bad_request"),
    ({"config": {"generators": [5]}, "num_layers": 6, "num_participants": 2}, "bad_request"),
    ({"config": {"kv_share_ratio": 0.5, "kv_selection": "bogus"}, "num_layers": 6, "num_participants": 2},
     "bad_request"),
    # Not even well-formed (a type, a range): dropped unanswered, counted.
    ({"config": "uniform", "num_layers": 6, "num_participants": 2}, None),
    ({"config": {}, "num_layers": 10**9, "num_participants": 2}, None),
    ({"config": {}, "num_layers": 6, "num_participants": 0}, None),
])
def test_a_malformed_session_is_refused_and_the_coordinator_keeps_serving(coordinator, header, answer):
    connection = CoordinatorConnection(coordinator.endpoint, timeout_s=0.5 if answer is None else 5)
    with pytest.raises(CoordinatorError) as refused:
        connection.call({"op": "open", "admin_key": KEY, "session": "bad", **header})
    assert refused.value.code == (answer or "unreachable") and "bad" not in coordinator.sessions
    assert coordinator.dropped["malformed"] == (answer is None)
    open_session(coordinator)  # still serving


def test_admin_operations_need_the_admin_key(coordinator):
    with pytest.raises(CoordinatorError) as refused:
        SessionAdmin(coordinator.endpoint, b"wrong", timeout_s=0.5).open("s", FedAttnConfig().resolve(6, 2))
    assert refused.value.code == "unreachable" and coordinator.dropped["unauthenticated"] == 1
    assert not coordinator.sessions


def test_a_separate_process_publishes_what_this_one_fetches(coordinator):
    _, engines = open_session(coordinator)
    credential = engines[0]._credential("s", 0)["credential"]
    script = f"""
import torch
from fedattn_vllm.federated.client import NetworkKVExchange
exchange = NetworkKVExchange({coordinator.endpoint!r})
exchange.join("s", 0, {credential!r})
g = torch.Generator().manual_seed(0)
exchange.publish("s", 0, 4, tuple(torch.randn(9, 2, 64, generator=g) for _ in range(2)))
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    received = engines[1].fetch("s", 1, 0, 4)
    assert len(received) == 2 and all(torch.equal(a, b) for a, b in zip(received, kv(9)))
