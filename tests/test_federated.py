"""Federated mode: engine processes each holding only their participants, K/V through a coordinator.

One 3-engine cluster (tiny random Qwen2, fp32) serves the module; its coordinator runs in
this process and records every frame it receives, and every control message the
orchestrator sends is recorded too, so the privacy tests assert on what actually moved.
The fault tests come last: they stop and kill engines.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import msgspec
import pytest
import torch
import zmq
from conftest import TINY_ENGINE_ARGS, RecordingCoordinator, federated_engine, greedy, random_case, random_tokens

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError, KVWire
from fedattn_vllm.cost import ModelShape, participant_costs
from fedattn_vllm.session import FedAttnSession, FedAttnSessionError
from fedattn_vllm.federated.curve import ClientCurve, Keypair, ServerCurve, new_keypair, public_key
from fedattn_vllm.federated.local import LocalCluster, local_keys
from fedattn_vllm.federated.wire import decode

MODEL = "tiny-qwen2"
TIMEOUT_S = 6.0
ADMIN_KEY = b"federated-test-admin"
VOCAB = 256  # the tiny tokenizer's ids are all valid below this


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    """Every process's CURVE keypair; each trusts all of them (as a LocalCluster's own do)."""
    return local_keys(tmp_path_factory.mktemp("keys"), engines=3)


@pytest.fixture(scope="module")
def coordinator(keys_dir):
    server = RecordingCoordinator("tcp://127.0.0.1:*", ADMIN_KEY,
                                  curve=ServerCurve(Keypair.load(keys_dir / "coordinator.key_secret"), keys_dir))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def local(coordinator, keys_dir, tmp_path_factory):
    with LocalCluster(MODEL, engines=3, engine_args=TINY_ENGINE_ARGS, timeout_s=TIMEOUT_S,
                      log_dir=tmp_path_factory.mktemp("cluster"), coordinator=(coordinator.endpoint, ADMIN_KEY),
                      keys_dir=keys_dir) as c:
        yield c


@pytest.fixture(scope="module")
def colocated():
    return federated_engine(MODEL)


@pytest.fixture
def sent(local, monkeypatch):
    """Every control message the orchestrator sends, as (engine index, header)."""
    messages: list[tuple[int, dict]] = []
    for e, link in enumerate(local.cluster.links):
        original = link.send

        def send(header, e=e, original=original):
            messages.append((e, header))
            original(header)

        monkeypatch.setattr(link, "send", send)
    return messages


def tokens(result) -> dict[int, list[int]]:
    assert result.error is None, result.error
    return {g: out.token_ids for g, out in result.outputs.items()}


def test_an_engine_cannot_report_text_for_a_participant_it_does_not_host():
    from types import SimpleNamespace

    from fedattn_vllm.federated.cluster import FederatedCluster

    flight = SimpleNamespace(plan=SimpleNamespace(generators=(1, 2)), hosts={0: [0, 1], 1: [2]})
    assert FederatedCluster._generated(flight, 0, {"1": "x"}) == {1: "x"}
    for engine, outputs in ((0, {"2": "x"}), (1, {"0": "x"}), (1, {"1": "x"})):
        with pytest.raises(ValueError, match="does not host"):
            FederatedCluster._generated(flight, engine, outputs)


def test_logprobs_cross_the_wire_as_vllms_structure_and_malformed_ones_are_refused():
    from vllm.logprobs import Logprob

    from fedattn_vllm.session import logprobs_from_wire, logprobs_to_wire

    original = [{7: Logprob(-0.1, 1, "a"), 9: Logprob(-2.5, 2, None)}, {3: Logprob(float("-inf"), 5, "b")}]
    assert logprobs_from_wire(logprobs_to_wire(original), [7, 3]) == original
    assert logprobs_from_wire(None, [1, 2]) is None
    good = [[7, -0.1, 1, "a"]], [[3, -1.0, 1, "b"]]
    for bad in ([[]], [good[0]] * 3, [[[7, "x", 1, "a"]], good[1]], [[[True, -0.1, 1, "a"]], good[1]],
                [[[7, -0.1, 1]], good[1]], [["x"], good[1]], "xy", [good[0], []], [good[0], [[4, -1.0, 1, "c"]]]):
        with pytest.raises(ValueError, match="logprobs"):
            logprobs_from_wire(bad, [7, 3])


def assert_all_freed(local, coordinator, engines=(0, 1, 2), deadline_s: float = 15.0) -> None:
    """Nothing of any session is left on any engine or at the coordinator (aborts are asynchronous)."""
    deadline = time.monotonic() + deadline_s
    while True:
        held = [{k: v for k, v in s.items() if k not in ("event", "ref", "dropped") and v}
                for s in local.cluster.status(engines)]
        if not any(held) and not coordinator.sessions:
            return
        assert time.monotonic() < deadline, f"left behind: engines {held}, coordinator {list(coordinator.sessions)}"
        time.sleep(0.2)


def test_federated_tokens_equal_colocated_and_payload_bytes_equal_the_cost_model(local, colocated):
    """Exact and quantised K/V on the wire, question selection (the generators' queries cross too): both modes
    compute on the same values and count the same bytes."""
    rng = random.Random("federated-grid")
    wires = tuple(KVWire)
    cases = [random_case(rng, len(colocated.tokenizer), colocated.num_layers, wires, selections)
             for selections in [("random", "key_norm")] * 24 + [("question",)] * 8]
    sessions = [case.session() for case in cases]
    plans = [case.config.resolve(colocated.num_layers, len(case.segments)) for case in cases]
    assert any(plan.question_readers(g, l, case.lengths) for plan, case in zip(plans, cases)
               for g in plan.generators for l in range(colocated.num_layers))  # some queries do cross engines
    placement = [[rng.randrange(3) for _ in s.segments] for s in sessions]
    federated = local.cluster.generate(sessions, placement)
    expected = colocated.generate(sessions)
    shape = ModelShape.from_hf_config(_hf_config(colocated), torch.float32)
    payload = wire = 0
    for case, result, reference in zip(cases, federated, expected):
        assert tokens(result) == tokens(reference), case
        costs = participant_costs(shape, case.config.resolve(colocated.num_layers, len(case.segments)), case.lengths,
                                  len(case.prefix))
        assert result.cost.published_bytes == [c.upload_bytes for c in costs], case
        assert result.cost.received_bytes == [c.download_bytes for c in costs], case
        for up, down, up_wire, down_wire in zip(result.cost.published_bytes, result.cost.received_bytes,
                                                result.cost.published_wire_bytes, result.cost.received_wire_bytes):
            messages = len(result.cost.sync_layers) * len(case.segments)  # a bound on one participant's messages
            # framing: a header (up to 6 tensors' specs: int4 codes, scales, minima of K and V) and the seal's tag
            assert 0 <= up_wire - up <= 220 * messages and 0 <= down_wire - down <= 120 * messages, case
            payload, wire = payload + up + down, wire + up_wire + down_wire
    print(f"\nframing overhead on the tiny model's small K/V: {100 * (wire - payload) / payload:.2f}% "
          f"({wire - payload} of {payload} bytes)")


def _hf_config(llm):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(llm.model_path)


def test_sessions_crossing_shared_engines_all_complete(local, colocated):
    """8 sessions over 3 engines in crossing orders, bigger together than one step: no deadlock."""
    rng = random.Random("crossing")
    vocab = len(colocated.tokenizer)
    orders = [[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1], [2, 0, 1], [1, 0, 2], [2, 2, 0, 1], [1, 0, 0, 2]]
    sessions = [
        FedAttnSession([random_tokens(rng, vocab, rng.randint(30, 60)) for _ in order],
                       FedAttnConfig(sync_interval=rng.randint(1, 3), generators=rng.choice([(-1,), (0,), (0, -1)])),
                       greedy(6))
        for order in orders
    ]
    federated = local.cluster.generate(sessions, orders)
    assert [tokens(r) for r in federated] == [tokens(r) for r in colocated.generate(sessions)]


def test_no_text_or_token_ids_reach_the_coordinator_or_foreign_engines(local, coordinator, colocated, sent):
    rng = random.Random("privacy")
    texts = ["the vault code is 4417 and only alice knows it", "bob's salary is ninety thousand per annum",
             "carol asks: what is the vault code"]
    ids = [random_tokens(rng, len(colocated.tokenizer), 24) for _ in range(3)]
    placement = [[0, 1, 2], [2, 0, 1]]
    coordinator.received.clear()
    public = "the public system prompt of the consortium"
    results = local.cluster.generate([
        FedAttnSession(texts, FedAttnConfig(sync_interval=1), greedy(4), public_prefix=public),
        FedAttnSession(ids, FedAttnConfig(sync_interval=2, generator_sync_interval=1), greedy(4)),
    ], placement)
    assert all(r.error is None for r in results)
    secrets = [[t.encode() for t in texts], [msgspec.msgpack.encode(i) for i in ids]]
    assert not any(public.encode() in raw for _, raw in coordinator.received)  # public, but the relay needs none
    # The coordinator: only protocol fields, never a segment's bytes.
    allowed = {"op", "session", "participant", "source", "layer", "credential", "wait_s", "tensors", "sealed",
               "admin_key", "config", "num_layers", "num_participants"}
    assert coordinator.received
    for header, raw in coordinator.received:
        assert set(header) <= allowed, set(header) - allowed
        assert not any(secret in raw for session in secrets for secret in session)
        assert header["op"] != "publish" or header["sealed"] is True  # K/V it relays but cannot read
    # Each engine: segments only of the participants it hosts, and no trace of anyone else's; the sessions' seal
    # keys went to the engines and never to the coordinator.
    submits = [(e, h) for e, h in sent if h["op"] == "submit"]
    assert len(submits) == 6
    assert all(len(h["seal_key"]) == 32 for _, h in submits)
    assert not any(h["seal_key"] in raw for _, h in submits for _, raw in coordinator.received)
    for e, header in submits:
        s = 0 if isinstance(header["segments"][next(iter(header["segments"]))], str) else 1
        hosted = {n for n, engine in enumerate(placement[s]) if engine == e}
        assert set(header["segments"]) == hosted and set(header["credentials"]) == hosted
        assert header["public_prefix"] == (public if s == 0 else None)  # every engine computes the prefix
        raw = msgspec.msgpack.encode(header)
        assert not any(secrets[s][n] in raw for n in range(3) if n not in hosted)


def test_bad_input_is_refused_with_the_field_named_and_other_sessions_complete(local, colocated):
    good = FedAttnSession([[5, 6, 7], [8, 9]], FedAttnConfig(sync_interval=2), greedy(3))
    with pytest.raises(FedAttnSessionError) as raised:
        local.cluster.generate([good], placement=[[0, 3]])
    assert raised.value.field == "placement[0]"
    with pytest.raises(FedAttnSessionError) as raised:
        local.cluster.generate([FedAttnSession([[5], b"xyz"])])
    assert raised.value.field == "segments[1]"
    bad = FedAttnSession([[5, 6], [10**6]], FedAttnConfig(sync_interval=2), greedy(3))  # out of vocabulary
    results = local.cluster.generate([good, bad, good], placement=[[0, 1], [2, 1], [1, 2]])
    assert results[1].error_field == "segments[1]" and "vocabulary" in results[1].error
    assert tokens(results[0]) == tokens(results[2]) == tokens(colocated.generate([good])[0])
    assert tokens(local.cluster.generate([good], [[1, 2]], pipelined=False)[0]) == tokens(results[0])  # serial
    asking = FedAttnSession([[5, 6, 7], [8, 9]], FedAttnConfig(sync_interval=2, kv_share_ratio=0.5,
                                                                kv_selection="question"), greedy(3))
    with pytest.raises(FedAttnConfigError) as raised:  # the publisher would wait for a generator started after it
        local.cluster.generate([asking], [[1, 2]], pipelined=False)
    assert raised.value.field == "kv_selection"


def _control_socket(local, curve: ClientCurve | None) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(socket)
    socket.connect(local.cluster.links[0].endpoint)
    return socket


def test_an_engine_admits_only_the_keys_it_trusts(local, keys_dir, tmp_path):
    """A control client with an unknown CURVE key, or none, is never heard: not even its status request."""
    new_keypair(tmp_path, "stranger")
    status = msgspec.msgpack.encode({"op": "status", "key": local._env["FEDATTN_ENGINE_KEY"].encode(), "ref": 1})
    [before] = local.cluster.status([0])
    for curve in [ClientCurve(Keypair.load(tmp_path / "stranger.key_secret"), public_key(keys_dir / "engine0.key")),
                  None]:
        socket = _control_socket(local, curve)
        try:
            socket.send_multipart([status])
            assert not socket.poll(1500)
        finally:
            socket.close(0)
    [after] = local.cluster.status([0])
    assert after["dropped"] == before["dropped"]  # nothing reached the engine's parser: ZeroMQ's authenticator did


def test_an_engine_drops_hostile_control_messages_and_keeps_serving(local, coordinator, colocated, keys_dir):
    """Random and crafted commands (no key, a wrong key, junk fields, a keyed submit that lies) at engine 0,
    from a peer it trusts (the orchestrator's CURVE key: an insider)."""
    rng = random.Random(7)
    key = local._env["FEDATTN_ENGINE_KEY"].encode()
    submit = {"op": "submit", "key": key, "session": "evil", "num_participants": 2, "segments": {0: [1, 2]},
              "credentials": {0: b"c" * 16}, "config": {}, "sampling": msgspec.msgpack.encode(None), "wait_s": 1.0}
    crafted = [
        {"op": "shutdown"}, {"op": "shutdown", "key": b"guess"}, {"op": "shutdown", "key": 2**63},
        {"op": "go", "key": key, "sessions": [{"session": "x", "lengths": [-1]}]},
        {"op": "go", "key": key, "sessions": "all"}, {"op": "abort", "key": key, "session": ["x"]},
        {**submit, "wait_s": float("inf")}, {**submit, "segments": {0: [2**40]}, "credentials": {0: b"c"}},
        {**submit, "config": {"seed": 2**64 - 1}}, {**submit, "config": {"bogus": 1}},
        {**submit, "segments": {5: [1, 2]}, "credentials": {5: b"c"}},
        {**submit, "segments": {0: "x"}, "credentials": {0: b"c"}, "sampling": b"\xc1junk"},
        {"op": "status", "key": key, "ref": 2**64 - 1}, {"op": "info", "key": key, "ref": "x"},
    ]
    messages = [[msgspec.msgpack.encode(h)] for h in crafted]
    messages += [[rng.randbytes(rng.randrange(1, 200))] for _ in range(100)]
    messages += [[msgspec.msgpack.encode({"op": rng.choice(["submit", "go", "abort"]), "key": key,
                                         "session": rng.randbytes(4)})] for _ in range(50)]
    socket = _control_socket(local, ClientCurve(Keypair.load(keys_dir / "orchestrator.key_secret"),
                                                public_key(keys_dir / "engine0.key")))
    try:
        for frames in messages:
            socket.send_multipart(frames)
        replies = []
        while socket.poll(2000):
            replies.append(decode(socket.recv_multipart())[0])
    finally:
        socket.close(0)
    # Answered: only the keyed submits that decode (each refused, naming the field) and the status request.
    assert {r["event"] for r in replies} <= {"done", "status"} and all(r.get("error") for r in replies if r["event"] == "done")
    assert {r["field"] for r in replies if r["event"] == "done"} == {"segments", "config", "seed", "sampling_params"}
    [status] = local.cluster.status([0])
    assert status["dropped"]["unauthenticated"] == 1 and sum(status["dropped"].values()) >= len(messages) - len(replies) - 2
    assert local.engine_processes[0].poll() is None
    session = FedAttnSession([random_tokens(rng, VOCAB, 10) for _ in range(3)], FedAttnConfig(sync_interval=1), greedy(3))
    assert tokens(local.cluster.generate([session])[0]) == tokens(colocated.generate([session])[0])
    assert_all_freed(local, coordinator)


def _stop_on_ready(local, monkeypatch, engine: int, resume_after_s: float | None) -> None:
    """SIGSTOP `engine` the moment it reports a session reserved (so its peers start and wait on it)."""
    original = local.cluster._on_event
    pid = local.cluster.engine_pids[engine]

    def on_event(e, event):
        if e == engine and event.get("event") == "ready":
            os.kill(pid, signal.SIGSTOP)
            if resume_after_s is not None:
                threading.Timer(resume_after_s, os.kill, (pid, signal.SIGCONT)).start()
        original(e, event)

    monkeypatch.setattr(local.cluster, "_on_event", on_event)


def test_a_slow_peer_within_the_timeout_only_delays_its_session(local, colocated, monkeypatch):
    session = FedAttnSession([random_tokens(random.Random(1), VOCAB, 30) for _ in range(3)],
                             FedAttnConfig(sync_interval=2), greedy(5))
    _stop_on_ready(local, monkeypatch, engine=2, resume_after_s=TIMEOUT_S / 3)
    [result] = local.cluster.generate([session], placement=[[2, 0, 1]])
    assert tokens(result) == tokens(colocated.generate([session])[0])
    assert result.wall_s >= TIMEOUT_S / 3


def test_a_peer_slower_than_the_timeout_fails_its_session_alone_and_everything_is_freed(
        local, coordinator, colocated, monkeypatch):
    """Engines 0 and 1 block in a K/V fetch on the stopped engine 2 until the timeout; then all recover."""
    rng = random.Random(2)
    victim = FedAttnSession([random_tokens(rng, VOCAB, 20) for _ in range(3)], FedAttnConfig(sync_interval=1), greedy(4))
    bystander = FedAttnSession([random_tokens(rng, VOCAB, 20) for _ in range(2)], FedAttnConfig(sync_interval=1), greedy(4))
    _stop_on_ready(local, monkeypatch, engine=2, resume_after_s=TIMEOUT_S * 2)
    started = time.monotonic()
    results = local.cluster.generate([victim, bystander], placement=[[2, 0, 1], [0, 1]])
    assert results[0].error and ("did not arrive in time" in results[0].error or "sent nothing" in results[0].error)
    assert time.monotonic() - started < TIMEOUT_S * 2
    assert tokens(results[1]) == tokens(colocated.generate([bystander])[0])
    time.sleep(TIMEOUT_S * 2 - (time.monotonic() - started) + 0.5)  # engine 2 resumes and learns of the abort
    assert_all_freed(local, coordinator)
    monkeypatch.undo()
    again = local.cluster.generate([victim], placement=[[2, 0, 1]])[0]
    assert tokens(again) == tokens(colocated.generate([victim])[0])


def test_a_participant_that_never_arrives_fails_its_session_after_the_silence_limit(local, coordinator, colocated):
    """Engine 1 is stopped before it sees the session: it never reserves, so nobody starts; then it returns."""
    rng = random.Random(4)
    victim = FedAttnSession([random_tokens(rng, VOCAB, 12) for _ in range(2)], FedAttnConfig(sync_interval=2), greedy(3))
    bystander = FedAttnSession([random_tokens(rng, VOCAB, 12) for _ in range(2)], FedAttnConfig(sync_interval=2),
                               greedy(3))
    pid = local.cluster.engine_pids[1]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        results = local.cluster.generate([victim, bystander], placement=[[0, 1], [2, 0]])
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "engine 1 sent nothing" in results[0].error
    assert local.cluster.silence_s <= waited < local.cluster.silence_s + 5
    assert tokens(results[1]) == tokens(colocated.generate([bystander])[0])
    assert_all_freed(local, coordinator)  # engine 1 reserves it late, then learns of the abort
    assert tokens(local.cluster.generate([victim], placement=[[0, 1]])[0]) == tokens(colocated.generate([victim])[0])


def test_a_killed_engine_fails_its_sessions_while_the_others_complete(local, coordinator, colocated):
    """Last: engine 2 is stopped before it can publish, then killed mid-session."""
    rng = random.Random(3)
    victim = FedAttnSession([random_tokens(rng, VOCAB, 20) for _ in range(3)], FedAttnConfig(sync_interval=1), greedy(4))
    bystander = FedAttnSession([random_tokens(rng, VOCAB, 20) for _ in range(2)], FedAttnConfig(sync_interval=1), greedy(4))
    process = local.engine_processes[2]
    os.kill(process.pid, signal.SIGSTOP)
    threading.Timer(1.0, process.kill).start()
    started = time.monotonic()
    results = local.cluster.generate([victim, bystander], placement=[[0, 2, 1], [1, 0]])
    assert "engine 2 exited" in results[0].error and time.monotonic() - started < TIMEOUT_S
    assert tokens(results[1]) == tokens(colocated.generate([bystander])[0])
    assert_all_freed(local, coordinator, engines=(0, 1))
    assert tokens(local.cluster.generate([bystander], placement=[[0, 1]])[0]) == tokens(results[1])
    # Restarted: while it starts, sessions that need it fail at once; then it serves them again.
    assert "restarting" in local.cluster.down[2] and local.cluster.restarts[2] == 1
    assert "engine 2 is down" in local.cluster.generate([victim], placement=[[0, 2, 1]])[0].error
    deadline = time.monotonic() + 180
    while 2 in local.cluster.down:
        assert time.monotonic() < deadline, local.cluster.down
        local.cluster.maintain()
        time.sleep(0.5)
    assert local.engine_processes[2].pid == local.cluster.engine_pids[2] != process.pid
    assert tokens(local.cluster.generate([victim], placement=[[0, 2, 1]])[0]) == tokens(colocated.generate([victim])[0])
    assert_all_freed(local, coordinator)


def test_a_restarting_coordinator_is_reported_down_until_it_listens_again(colocated, tmp_path):
    """A cluster owning its coordinator process: killed, it is restarted; meanwhile sessions fail at once and
    `coordinator_down` (the server's /health) says why; then the same engines serve through the new one."""
    session = FedAttnSession([[5] * 8, [6] * 8], FedAttnConfig(sync_interval=2), greedy(3))
    with LocalCluster(MODEL, engines=1, engine_args=TINY_ENGINE_ARGS, timeout_s=TIMEOUT_S, log_dir=tmp_path) as own:
        engine_pid = own.cluster.engine_pids[0]
        own.coordinator_process.kill()
        own.coordinator_process.wait()
        own.cluster.maintain()
        assert "restarting (restart 1 of 3)" in own.cluster.coordinator_down
        assert "the coordinator exited" in own.cluster.generate([session], placement=[[0, 0]])[0].error
        deadline = time.monotonic() + 120
        while own.cluster.coordinator_down is not None:
            assert time.monotonic() < deadline, own.cluster.coordinator_down
            own.cluster.maintain()
            time.sleep(0.1)
        while (result := own.cluster.generate([session], placement=[[0, 0]])[0]).error is not None:
            assert time.monotonic() < deadline, result.error  # listening; the engine reconnects by itself
            time.sleep(0.5)
        assert tokens(result) == tokens(colocated.generate([session])[0])
        assert own.cluster.engine_pids[0] == engine_pid and own.cluster.restarts == [0]  # the same engine
