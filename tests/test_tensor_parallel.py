"""FedAttn under vLLM's tensor parallelism: each rank holds, publishes and fetches its own heads' K/V.

TP = 2 on the tiny model (vLLM's CPU backend, a core per rank; its one KV head replicated on both ranks)
against TP = 1, itself held to the oracle in tests/test_engine.py.
"""

from __future__ import annotations

import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from conftest import TINY_ENGINE_ARGS, federated_engine, load_hf, random_case

from fedattn_vllm.config import KVWire
from fedattn_vllm.cost import ModelShape, participant_costs

MODEL = "tiny-qwen2"
GRIDS = [("random", "key_norm"), ("question",)]
WIRES = (KVWire.NATIVE, KVWire.INT8, KVWire.K4V2)


def _cases(vocab: int, num_layers: int, selections: tuple[str, ...]) -> list:
    rng = random.Random(f"tp2-{selections}")
    return [random_case(rng, vocab, num_layers, WIRES, selections) for _ in range(16)]


def _graphs_compiled(worker) -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _run_colocated_tp2() -> tuple[list[list[tuple]], dict, list[int]]:
    """In a child process: every grid's sessions on a colocated TP = 2 engine, as (error, tokens, published bytes,
    received bytes), what the engine holds afterwards and the graphs each rank compiled. A child, because in-process vLLM engines share the
    process's distributed state and one that stops tears it down: the other tests' TP = 1 engine stays clear."""
    from fedattn_vllm.engine import FederatedLLM

    llm = FederatedLLM(MODEL, **TINY_ENGINE_ARGS, tensor_parallel_size=2)
    grids = []
    for selections in GRIDS:
        results = llm.generate([c.session() for c in _cases(len(llm.tokenizer), llm.num_layers, selections)])
        grids.append([(r.error, {g: o.token_ids for g, o in r.outputs.items()}, r.cost.published_bytes,
                       r.cost.received_bytes) for r in results])
    return grids, llm.holdings(), llm.llm.collective_rpc(_graphs_compiled)


@pytest.fixture(scope="module")
def colocated_tp2():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(_run_colocated_tp2).result(timeout=900)


@pytest.mark.parametrize("grid", range(len(GRIDS)), ids=["-".join(g) for g in GRIDS])
def test_tp2_equals_tp1_token_for_token_and_bytes_match_the_cost_model(colocated_tp2, grid):
    """Data-dependent choices (key norm, the questions' attention, sparse local computation) are made over every
    rank's heads, so both ranks pick what one device would; replicated K/V heads are counted once."""
    tp1 = federated_engine(MODEL)
    cases = _cases(len(tp1.tokenizer), tp1.num_layers, GRIDS[grid])
    expected = tp1.generate([case.session() for case in cases])
    shape = ModelShape.from_hf_config(load_hf(MODEL)[0].config, torch.float32)
    for case, (error, tokens, published, received), want in zip(cases, colocated_tp2[0][grid], expected):
        assert error is None and want.error is None, case
        assert tokens == {g: o.token_ids for g, o in want.outputs.items()}, case
        costs = participant_costs(shape, case.config.resolve(tp1.num_layers, len(case.segments)), case.lengths,
                                  len(case.prefix))
        assert published == [c.upload_bytes for c in costs], case
        assert received == [c.download_bytes for c in costs], case
    # nothing left on either rank
    assert colocated_tp2[1] == {"sessions": 0, "paged_blocks": 0, "requests": 0, "unfinished": 0}


def test_tp2_ranks_compile_nothing_inside_a_step(colocated_tp2):
    """vLLM compiles the vocab-parallel embedding's masking at a rank's first step unless torch.compile is off in
    the ranks (`surface.run_eager`); inside a federated step every other party waits on that build (minutes on a
    loaded machine: the orchestrator gave such an engine up as stalled)."""
    assert colocated_tp2[2] == [0, 0]


@pytest.fixture(scope="module")
def tp2_cluster(tmp_path_factory):
    """Two federated engines of two ranks each (a coordinator process, CURVE links, sealed K/V)."""
    from fedattn_vllm.federated.local import LocalCluster

    # Six processes (a coordinator, two engines of two ranks) on a loaded 2-core machine: a peer's K/V can take
    # long, never forever (the timeout is for a peer that is gone).
    with LocalCluster(MODEL, engines=2, engine_args={**TINY_ENGINE_ARGS, "tensor_parallel_size": 2}, timeout_s=120,
                      log_dir=tmp_path_factory.mktemp("tp2-cluster")) as local:
        yield local


def test_federated_tp2_engines_equal_colocated_tp1_and_the_coordinator_sees_whole_payloads(tp2_cluster):
    """Each engine's rank gateway joins its ranks' heads into the payload one device would publish (the
    coordinator's byte counts are the cost model's) and splits what it fetches; tokens equal colocated TP = 1."""
    tp1 = federated_engine(MODEL)
    rng = random.Random("tp2-federated")
    cases = [random_case(rng, len(tp1.tokenizer), tp1.num_layers, (KVWire.NATIVE, KVWire.K4V2), selections)
             for selections in [("random", "key_norm"), ("question",)] for _ in range(6)]
    sessions = [case.session() for case in cases]
    expected = tp1.generate(sessions)
    results = tp2_cluster.cluster.generate(sessions, [[rng.randrange(2) for _ in s.segments] for s in sessions])
    shape = ModelShape.from_hf_config(load_hf(MODEL)[0].config, torch.float32)
    for case, got, want in zip(cases, results, expected):
        assert got.error is None, (case, got.error)
        assert {g: o.token_ids for g, o in got.outputs.items()} == {g: o.token_ids for g, o in want.outputs.items()}
        costs = participant_costs(shape, case.config.resolve(tp1.num_layers, len(case.segments)), case.lengths,
                                  len(case.prefix))
        assert got.cost.published_bytes == [c.upload_bytes for c in costs], case
        assert got.cost.received_bytes == [c.download_bytes for c in costs], case
    for engine in tp2_cluster.cluster.status():
        left = (engine["rank_slots"], engine["sessions"], engine["paged_blocks"], engine["credentials"])
        assert left == (0, 0, 0, 0), engine
