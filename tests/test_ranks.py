"""The rank gateway of a federated engine under tensor parallelism, with real sockets and a real exchange behind it
(the end-to-end check, TP = 2 engines against TP = 1, is in tests/test_tensor_parallel.py)."""

from __future__ import annotations

import functools
import os
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import zmq

from fedattn_vllm.config import KVWire
from fedattn_vllm.exchange import InProcessKVExchange, KVExchangeError, PayloadKind
from fedattn_vllm.federated import ranks
from fedattn_vllm.federated.ranks import HeadShards, RankExchange, RankGateway
from fedattn_vllm.kv_wire import encode_kv


@pytest.fixture
def gateway(request):
    ranks, heads, kv_heads = request.param
    behind = InProcessKVExchange()
    gateway = RankGateway(behind, HeadShards(ranks, heads, kv_heads))
    copies = frozenset({PayloadKind.QUESTIONS})  # a rank holding a copy of a KV head counts (and sends) no K/V
    clients = [RankExchange(gateway.endpoints, r, frozenset(PayloadKind) if r in
                            gateway.shards.contributors(PayloadKind.KV) else copies) for r in range(ranks)]
    yield gateway, behind, clients
    gateway.close()


def on_every_rank(clients, call):
    """call(rank, client) on each rank at once (ranks run in lockstep); their results, or their exceptions."""
    def outcome(rank):
        try:
            return call(rank, clients[rank])
        except KVExchangeError as error:
            return error

    with ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(outcome, range(len(clients))))


def test_head_shards_follow_vllms_split_and_count_a_copied_kv_head_once():
    split = HeadShards(ranks=4, heads=8, kv_heads=2)
    assert [split.span(r, PayloadKind.QUESTIONS) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [split.span(r, PayloadKind.KV) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert split.contributors(PayloadKind.KV) == [0, 2] and split.contributors(PayloadKind.QUESTIONS) == [0, 1, 2, 3]
    assert HeadShards(2, 4, 4).span(1, PayloadKind.KV) == (2, 2)


@pytest.mark.parametrize("gateway", [(2, 4, 2), (4, 4, 2)], indirect=True, ids=["split heads", "copied heads"])
def test_shards_publish_as_one_payload_and_each_rank_fetches_its_heads(gateway):
    gateway, behind, clients = gateway
    split = gateway.shards
    whole = (torch.randn(5, split.kv_heads, 8), torch.randn(5, split.kv_heads, 8))
    shard = lambda rank: split.split(whole, rank, PayloadKind.KV)  # noqa: E731  what each rank computed
    assert on_every_rank(clients, lambda r, c: c.publish("s", 0, 3, shard(r))) == [None] * split.ranks
    published = behind.fetch("s", 1, 0, 3)
    assert all(torch.equal(a, b) for a, b in zip(published, whole))  # the payload one device would publish
    fetched = on_every_rank(clients, lambda r, c: c.fetch("s", 1, 0, 3))
    for rank, payload in enumerate(fetched):
        assert all(torch.equal(a, b) for a, b in zip(payload, shard(rank)))
    counted = sum(c.stats("s").published_bytes[0] for c in clients)
    assert counted == sum(t.numel() * t.element_size() for t in whole)
    assert gateway.pending() == 0  # every rank took its outcome: nothing kept


@pytest.mark.parametrize("gateway", [(2, 2, 1)], indirect=True)
def test_every_rank_gets_the_same_error_and_release_frees_the_session(gateway):
    gateway, behind, clients = gateway
    errors = on_every_rank(clients, lambda r, c: c.fetch("s", 1, 0, 2))  # never published
    assert all(isinstance(e, KVExchangeError) and "not published" in str(e) for e in errors)
    bad = on_every_rank(clients, lambda r, c: c.publish("t", 1, 0, (torch.zeros(2, 1, 4 + r),), PayloadKind.QUESTIONS))
    assert all(isinstance(e, KVExchangeError) and "rank gateway" in str(e) for e in bad)
    questions = on_every_rank(clients, lambda r, c: c.publish("u", 1, 0, (torch.ones(2, 1, 4),), PayloadKind.QUESTIONS))
    assert questions == [None, None] and behind.fetch("u", 0, 1, 0, PayloadKind.QUESTIONS)[0].shape == (2, 2, 4)
    on_every_rank(clients, lambda r, c: c.release("u"))
    assert gateway.pending() == 0 and behind.live_sessions() == 0  # "t"'s shards did not fit: nothing was stored


@pytest.mark.parametrize("gateway", [(2, 4, 2)], indirect=True)
@pytest.mark.parametrize("bad", ["not finite in one rank's heads", "too few heads", "a low-bit scale not finite"])
def test_a_bad_payload_from_another_party_fails_every_rank_alike(gateway, bad):
    """Each rank's own checks see only its heads: the gateway checks the whole payload once, so that the ranks
    (in lockstep through their all-reduces) never disagree about a session."""
    gateway, behind, clients = gateway
    k = torch.randn(3, 2, 4)
    if bad == "too few heads":
        k = k[:, :1]
    elif bad == "not finite in one rank's heads":
        k[:, 1] = float("nan")
    payload = (k, k.clone())
    if bad == "a low-bit scale not finite":  # head 1's statistics (its own row), which only rank 1 decodes
        payload = encode_kv(payload, KVWire.K4V2)
        payload[0][0, 1, 0] = float("nan")
    behind.publish("s", 0, 1, payload)
    errors = on_every_rank(clients, lambda r, c: c.fetch("s", 1, 0, 1))
    assert all(isinstance(e, KVExchangeError) for e in errors), errors
    assert gateway.pending() == 0


@pytest.mark.parametrize("gateway", [(2, 4, 2)], indirect=True)
def test_a_rank_whose_peer_never_sends_its_shard_is_reported_then_fails(gateway, monkeypatch, caplog):
    """Ranks out of step (one publishes what the other never does) stall on the slot: the gateway logs who waits on
    what, with the ranks whose shards are in, until the longest wait passes and the slot fails."""
    gateway, _, clients = gateway
    monkeypatch.setattr(ranks, "MAX_WAIT_S", 0.5)
    monkeypatch.setattr(ranks, "REPLY_MARGIN_S", 0.5)  # the rank waits a margin beyond its gateway
    monkeypatch.setattr(ranks, "STALL_REPORT_S", 0.2)
    shard = (torch.randn(3, 1, 8), torch.randn(3, 1, 8))
    with pytest.raises(KVExchangeError, match="no outcome for publish of session s"):
        clients[0].publish("s", 0, 3, shard)
    assert "rank 0 has waited" in caplog.text and "shards in from ranks [0]" in caplog.text


@pytest.mark.parametrize("gateway", [(2, 4, 2)], indirect=True)
def test_a_session_one_rank_fails_on_its_own_fails_on_every_rank_at_once(gateway, monkeypatch):
    """A rank's own checks see only its heads (the model's values there; a peer's low-bit codes that overflow
    float16 in them), so it may fail a session alone: it abandons the session at the gateway, and its peer, waiting
    on a shard that will never come, fails now rather than after the longest wait (600 s), as does every later call
    of the session on any rank; other sessions go on, and release leaves nothing behind."""
    gateway, behind, clients = gateway
    monkeypatch.setattr(ranks, "MAX_WAIT_S", 5.0)  # without the abandon the waiting publish ends "no outcome"
    monkeypatch.setattr(ranks, "REPLY_MARGIN_S", 1.0)
    shard = (torch.randn(3, 1, 8), torch.randn(3, 1, 8))
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(clients[0].publish, "s", 0, 3, shard)  # rank 0's shard is in, rank 1's never comes
        deadline = time.monotonic() + 10
        while gateway.pending() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not waiting.done()
        clients[1].abandon("s", "values that are not finite in its heads")
        with pytest.raises(KVExchangeError, match="rank 1 failed the session: values that are not finite"):
            waiting.result(timeout=10)
    for call in (lambda c: c.publish("s", 0, 4, shard), lambda c: c.fetch("s", 1, 0, 3)):
        errors = on_every_rank(clients, lambda r, c: call(c))
        assert all(isinstance(e, KVExchangeError) and "rank 1 failed the session" in str(e) for e in errors), errors
    assert on_every_rank(clients, lambda r, c: c.publish("t", 0, 3, shard)) == [None, None]  # another session
    on_every_rank(clients, lambda r, c: c.release("s"))
    on_every_rank(clients, lambda r, c: c.release("t"))
    assert gateway.pending() == 0 and behind.live_sessions() == 0


@pytest.mark.parametrize("here, elsewhere", [(True, True), (True, False), (False, True), (False, False)])
def test_what_a_rank_received_is_used_only_where_every_rank_accepted_it(monkeypatch, here, elsewhere):
    """A rank checks only its heads of what it receives, so its outcome is agreed with the others' (vLLM's group,
    `surface.rank_agreement`) before any goes on: a refusal anywhere is a KVExchangeError everywhere, and this rank's
    own error is the one it raises."""
    from fedattn_vllm.vllm_ext import attention

    asked = []

    def agree(ok, device):
        asked.append(ok)
        return ok and elsewhere

    monkeypatch.setattr(attention, "rank_agreement", lambda: agree)

    def read(value):
        if not here:
            raise KVExchangeError("a value that overflows in this rank's heads")
        return value

    if here and elsewhere:
        assert attention._agreed(read, torch.device("cpu"), 7) == 7
    else:
        with pytest.raises(KVExchangeError, match="overflows" if not here else "another tensor-parallel rank"):
            attention._agreed(read, torch.device("cpu"), 7)
    assert asked == [here]
    monkeypatch.setattr(attention, "rank_agreement", lambda: None)  # one rank: its own outcome, nothing asked
    assert attention._agreed(lambda: 3, torch.device("cpu")) == 3 and asked == [here]


def test_any_error_in_what_a_rank_reads_is_agreed_on_before_it_is_raised(monkeypatch):
    """Not only a refusal: a rank that left the agreement by raising anything would leave the others waiting in
    it."""
    from fedattn_vllm.vllm_ext import attention

    asked = []
    monkeypatch.setattr(attention, "rank_agreement", lambda: lambda ok, device: asked.append(ok) or ok)

    def read():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        attention._agreed(read, torch.device("cpu"))
    assert asked == [False]


_RANK = """
import sys, time
from fedattn_vllm.federated.ranks import RankExchange, RankGatewayError
rank = RankExchange([sys.argv[1]], 0)
start = time.monotonic()
try:
    rank.fetch("s", 0, 1, 0)
except RankGatewayError as error:
    print(f"{time.monotonic() - start:.1f} {error}", flush=True)
"""
_ENGINE = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=sys.stdout)
print(rank.pid, flush=True)
time.sleep(600)
"""


def test_a_rank_waiting_on_its_gateway_ends_with_the_engine_process(tmp_path):
    """A rank blocked mid-step on a gateway that never answers gives up once the process that started it (the
    engine, the gateway's host) is killed, so no worker outlives its engine; vLLM's own watch of its parent acts
    only between steps."""
    endpoint = f"ipc://{tmp_path / 'rank0'}"
    silent = zmq.Context.instance().socket(zmq.ROUTER)  # takes the request, never answers
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind(endpoint)
    engine = subprocess.Popen([sys.executable, "-c", _ENGINE, _RANK, endpoint], stdout=subprocess.PIPE, text=True)
    rank_pid = None
    try:
        rank_pid = int(engine.stdout.readline())
        assert silent.poll(60_000), "the rank never asked its gateway"
        silent.recv_multipart()
        engine.kill()
        engine.wait(timeout=10)
        assert select.select([engine.stdout], [], [], 30)[0], "the rank still waits on its gateway"
        waited_s, message = engine.stdout.readline().split(" ", 1)  # the rank's, through the pipe it inherited
        assert "engine process that hosts the rank gateway is gone" in message
        assert float(waited_s) < 30  # not the longest fetch wait
        deadline = time.monotonic() + 10
        while _alive(rank_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(rank_pid)
    finally:
        engine.kill()
        if rank_pid is not None and _alive(rank_pid):
            os.kill(rank_pid, signal.SIGKILL)
        silent.close(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has ended
