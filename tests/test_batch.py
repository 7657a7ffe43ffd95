"""The batch table (pure logic, on a stand-in for vLLM's model runner state): rows, global positions, split segments."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.vllm_ext.batch import FedAttnBatch
from fedattn_vllm.vllm_ext.surface import UntestedVLLMError, unsupported_vllm
from fedattn_vllm.vllm_ext.sessions import METADATA_KEY, REGISTRY, ParticipantMetadata

LENGTHS = [4, 3, 5]


def runner(rows: list[tuple[str, int | None, int, int]], prefix_len: int = 0):
    """rows: (request id, participant or None for a plain request, computed tokens, scheduled tokens)."""
    requests, starts, computed = {}, [0], []
    for req_id, participant, done, scheduled in rows:
        extra = None
        if participant is not None:
            plan = FedAttnConfig(sync_interval=2).resolve(6, len(LENGTHS))
            extra = {METADATA_KEY: ParticipantMetadata("s", participant, tuple(LENGTHS), prefix_len, plan)}
        requests[req_id] = SimpleNamespace(sampling_params=SamplingParams(extra_args=extra))
        starts.append(starts[-1] + scheduled)
        computed.append(done)
    input_batch = SimpleNamespace(req_ids=[r[0] for r in rows], num_reqs=len(rows),
                                  num_computed_tokens_cpu=np.array(computed))
    return SimpleNamespace(input_batch=input_batch, query_start_loc=SimpleNamespace(np=np.array(starts)),
                           requests=requests)


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    REGISTRY.release("s")


def test_rows_and_global_positions_of_a_mixed_batch():
    # plain request (2 tokens), participant 2 prefilling, participant 0 decoding its 3rd generated token
    batch = FedAttnBatch.from_runner(runner([("plain", None, 0, 2), ("p2", 2, 0, 5), ("p0", 0, 6, 1)]))
    assert [(e.participant, e.rows, e.prefill) for e in batch.entries] == [(2, slice(2, 7), True), (0, slice(7, 8), False)]
    positions = torch.tensor([0, 1, 0, 1, 2, 3, 4, 6])
    # participant 2 starts at offset 4 + 3 = 7; participant 0's local position 6 = L_0 + 2 -> L + 2 = 14
    assert batch.global_positions(positions).tolist() == [0, 1, 7, 8, 9, 10, 11, 14]


def test_a_public_prefix_keeps_its_positions_and_shifts_segments_and_generated_tokens():
    # prefix of 2: participant 2 prefills 2 + 5 rows, participant 0 decodes its 3rd generated token
    batch = FedAttnBatch.from_runner(runner([("p2", 2, 0, 7), ("p0", 0, 8, 1)], prefix_len=2))
    assert [(e.rows, e.segment_rows) for e in batch.entries] == [(slice(0, 7), slice(2, 7)), (slice(7, 8), slice(9, 8))]
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])
    # participant 2's segment starts at 2 + 4 + 3 = 9; participant 0's local 8 = P + L_0 + 2 -> P + L + 2 = 16
    assert batch.global_positions(positions).tolist() == [0, 1, 9, 10, 11, 12, 13, 16]


def test_a_batch_without_participants_is_left_alone():
    assert FedAttnBatch.from_runner(runner([("plain", None, 0, 3)])) is None


@pytest.mark.parametrize("done,scheduled", [(0, 2), (2, 3), (0, 6)], ids=["chunk", "rest-of-chunk", "recompute"])
def test_a_segment_not_computed_whole_fails_its_session_instead_of_computing_something_else(done, scheduled,
                                                                                              monkeypatch):
    """... and the worker abandons the session at its exchange, once (a tensor-parallel rank's peers then stop
    waiting on it)."""
    abandoned = []
    monkeypatch.setattr(REGISTRY.exchange, "abandon", lambda session, reason: abandoned.append((session, reason)))
    for _ in range(2):
        batch = FedAttnBatch.from_runner(runner([("p2", 2, done, scheduled)]))
        assert batch is None
        assert "not computed whole" in REGISTRY.failed(["s"])["s"]
    assert abandoned == [("s", REGISTRY.failed(["s"])["s"])]


def test_another_vllm_series_is_refused_unless_allowed(monkeypatch):
    monkeypatch.delenv("FEDATTN_ALLOW_UNTESTED_VLLM", raising=False)
    assert unsupported_vllm("0.32.0") is None and unsupported_vllm("0.32.3+cpu") is None
    assert "FEDATTN_ALLOW_UNTESTED_VLLM" in unsupported_vllm("0.33.0")
    monkeypatch.setenv("FEDATTN_ALLOW_UNTESTED_VLLM", "1")
    assert unsupported_vllm("0.33.0") is None


def test_another_vllm_series_leaves_plain_vllm_alone_and_the_engine_says_why(monkeypatch):
    """The plugin runs in every vLLM process: on another series it registers nothing (and raises nothing)."""
    from vllm import ModelRegistry

    from fedattn_vllm.engine import FederatedLLM
    from fedattn_vllm.plugin import register
    from fedattn_vllm.vllm_ext import surface

    monkeypatch.delenv("FEDATTN_ALLOW_UNTESTED_VLLM", raising=False)
    monkeypatch.setattr(surface, "installed_vllm", lambda: "0.99.0")
    registered = []
    monkeypatch.setattr(ModelRegistry, "register_model", lambda *args: registered.append(args))
    register()
    assert registered == []
    with pytest.raises(UntestedVLLMError, match="vllm 0.99.0"):
        FederatedLLM("tiny-qwen2")


def test_a_runner_without_the_state_it_reads_is_refused_by_name():
    stand_in = runner([("p2", 2, 0, 5)])
    del stand_in.query_start_loc
    with pytest.raises(UntestedVLLMError, match="query_start_loc"):
        FedAttnBatch.from_runner(stand_in)

