"""FedAttn inside vLLM (colocated) against the reference oracle and plain vLLM, on the tiny random models (fp32)."""

from __future__ import annotations

import gc
import random
import weakref

import psutil
import pytest
import torch
from conftest import greedy, plain_engine, random_case, random_tokens
from vllm import SamplingParams

from fedattn_vllm.config import FedAttnConfig, FedAttnConfigError
from fedattn_vllm.cost import ModelShape, participant_costs
from fedattn_vllm.engine import FedAttnEngineError, FederatedLLM
from fedattn_vllm.session import FedAttnSession, FedAttnSessionError
from fedattn_vllm.exchange import InProcessKVExchange, KVExchangeError
from fedattn_vllm.vllm_ext.sessions import REGISTRY
from kernels.paged import blocks_in_use


@pytest.mark.parametrize("grid,selections,count", [("grid", ("random", "key_norm"), 48),
                                                   ("question grid", ("question",), 24)])
def test_randomised_grid_matches_the_oracle_token_for_token_and_bytes_match_the_cost_model(
    tiny_engine, grid, selections, count
):
    rng = random.Random(f"{grid}-{tiny_engine.name}")
    llm, oracle = tiny_engine.llm, tiny_engine.oracle
    cases = [random_case(rng, len(tiny_engine.tokenizer), llm.num_layers, selections=selections)
             for _ in range(count)]
    results = llm.generate([case.session() for case in cases])
    shape = ModelShape.from_hf_config(tiny_engine.hf.config, torch.float32)
    for case, result in zip(cases, results):
        expected = oracle.generate(case.segments, case.config, case.max_tokens, ignore_eos=True,
                                   public_prefix=case.prefix)
        assert result.error is None, case
        assert {g: out.token_ids for g, out in result.outputs.items()} == expected.tokens, case
        costs = participant_costs(shape, case.config.resolve(llm.num_layers, len(case.segments)), case.lengths,
                                  len(case.prefix))
        assert result.cost.published_bytes == [c.upload_bytes for c in costs], case
        assert result.cost.received_bytes == [c.download_bytes for c in costs], case
        assert result.cost.tokens == case.lengths
        assert result.cost.sync_layers == expected.sync_layers


@pytest.mark.parametrize("wire,fewer,moved",
                         [("int8", 2.5, 0.25), ("int4", 3.5, None), ("k4v2", 4.0, None), ("int2", 5.0, None)])
def test_quantised_kv_on_the_wire_costs_what_the_model_says_and_stays_close_to_exact(tiny_engine, wire, fewer, moved):
    """fewer: a floor on fp32 / encoded bytes; moved: a bound on first-token log-prob changes.

    Random weights say little of 2-4 bit fidelity (their top tokens are near ties); the real
    model's K/V are tested in tests/test_engine_real.py and measured in RESULTS.md.
    """
    rng = random.Random(f"{wire}-{tiny_engine.name}")
    llm, vocab = tiny_engine.llm, len(tiny_engine.tokenizer)
    shape = ModelShape.from_hf_config(tiny_engine.hf.config, torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    cases = [[random_tokens(rng, vocab, rng.randint(30, 60)) for _ in range(rng.randint(2, 4))] for _ in range(12)]
    exact = llm.generate([FedAttnSession(s, FedAttnConfig(sync_interval=2), params) for s in cases])
    encoded = llm.generate([FedAttnSession(s, FedAttnConfig(sync_interval=2, kv_wire=wire), params) for s in cases])
    largest = 0.0
    for segments, a, b in zip(cases, exact, encoded):
        plan = FedAttnConfig(sync_interval=2, kv_wire=wire).resolve(llm.num_layers, len(segments))
        costs = participant_costs(shape, plan, [len(s) for s in segments])
        assert b.cost.published_bytes == [c.upload_bytes for c in costs]
        assert sum(a.cost.published_bytes) / sum(b.cost.published_bytes) > fewer
        g = len(segments) - 1
        first_a, first_b = a.outputs[g].logprobs[0], b.outputs[g].logprobs[0]
        common = first_a.keys() & first_b.keys()
        assert b.outputs[g].token_ids[0] in first_b
        assert moved is None or common  # int8: a wrong scale cannot hide in top-5 sets that do not overlap
        largest = max([largest, *(abs(first_a[t].logprob - first_b[t].logprob) for t in common)])
    print(f"\nlargest first-token log-prob change from {wire} K/V: {largest:.2e}")
    assert moved is None or largest < moved  # a wrong int8 scale moves them by whole units


@pytest.mark.parametrize("with_prefix", [False, True], ids=["segments", "public prefix + segments"])
def test_h1_and_n1_equal_plain_vllm_on_the_concatenated_prompt(tiny_engine, with_prefix):
    rng = random.Random(f"plain-{tiny_engine.name}-{with_prefix}")
    vocab = len(tiny_engine.tokenizer)
    prompts = [random_tokens(rng, vocab, rng.randint(12, 60)) for _ in range(6)]
    plain = plain_engine(tiny_engine.name).generate([{"prompt_token_ids": p} for p in prompts], greedy(16),
                                                    use_tqdm=False)
    sessions, expected = [], []
    for prompt, out in zip(prompts, plain):
        cut = rng.randint(1, 8) if with_prefix else 0
        prefix, rest = prompt[:cut], prompt[cut:]
        cuts = sorted(rng.sample(range(1, len(rest)), rng.randint(1, 3)))
        bounds = [0, *cuts, len(rest)]
        split = [rest[a:b] for a, b in zip(bounds, bounds[1:])]
        sessions.append(FedAttnSession(split, FedAttnConfig(sync_interval=1), greedy(16), public_prefix=prefix))  # H=1
        sessions.append(FedAttnSession([rest], FedAttnConfig(sync_interval=rng.randint(2, 4)), greedy(16),
                                       public_prefix=prefix))  # N = 1
        expected += [list(out.outputs[0].token_ids)] * 2
    results = tiny_engine.llm.generate(sessions)
    assert [r.outputs[len(s.segments) - 1].token_ids for r, s in zip(results, sessions)] == expected
    assert all(r.cost.prefix_tokens == len(s.public_prefix) for r, s in zip(results, sessions))


@pytest.mark.parametrize("mode", ["H=1", "mixed"])
def test_steps_whose_every_row_is_recomputed_skip_vllms_attention_and_match_the_oracle(tiny_engine, mode,
                                                                                      monkeypatch):
    """At H = 1 every row of every step is recomputed (prefill, a public prefix and participant 0 included; decode),
    and so with the generators reading every layer; beside sessions at H > 1 or N = 1, some steps' rows are left
    alone. vLLM's own attention runs exactly where a step has a row the sync step does not write."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from fedattn_vllm.vllm_ext import attention

    decisions, stock_calls = [], []
    replaces_stock, stock_forward = attention.replaces_stock, CPUAttentionBackendImpl.forward
    monkeypatch.setattr(attention, "replaces_stock", lambda *a: decisions.append(replaces_stock(*a)) or decisions[-1])
    monkeypatch.setattr(CPUAttentionBackendImpl, "forward",
                        lambda *a, **k: stock_calls.append(1) or stock_forward(*a, **k))
    rng = random.Random(f"whole-{mode}-{tiny_engine.name}")
    llm, vocab = tiny_engine.llm, len(tiny_engine.tokenizer)
    cases = []
    for i in range(8):
        n = rng.randint(2, 4) if mode == "H=1" or i % 3 else 1
        options = {"sync_interval": 1} if mode == "H=1" or i % 2 else {"sync_interval": rng.randint(2, 4)}
        if mode == "H=1" and i % 2:
            options["generator_sync_interval"] = 1
        config = FedAttnConfig(generators=tuple(rng.sample(range(n), rng.randint(1, n))), **options)
        prefix = random_tokens(rng, vocab, rng.randint(1, 6)) if rng.random() < 0.5 else []
        cases.append(([random_tokens(rng, vocab, rng.randint(1, 30)) for _ in range(n)], prefix, config,
                      rng.randint(2, 8)))
    results = llm.generate([FedAttnSession(s, c, greedy(m), public_prefix=p) for s, p, c, m in cases])
    for (segments, prefix, config, max_tokens), result in zip(cases, results):
        expected = tiny_engine.oracle.generate(segments, config, max_tokens, ignore_eos=True, public_prefix=prefix)
        assert {g: out.token_ids for g, out in result.outputs.items()} == expected.tokens
    assert len(stock_calls) == decisions.count(False)
    assert all(decisions) if mode == "H=1" else 0 < decisions.count(True) < len(decisions)


def test_plain_requests_in_a_fedattn_engine_are_untouched(tiny_engine):
    prompt = random_tokens(random.Random(5), len(tiny_engine.tokenizer), 30)
    mine = tiny_engine.llm.llm.generate([{"prompt_token_ids": prompt}], greedy(12), use_tqdm=False)
    stock = plain_engine(tiny_engine.name).generate([{"prompt_token_ids": prompt}], greedy(12), use_tqdm=False)
    assert mine[0].outputs[0].token_ids == stock[0].outputs[0].token_ids


def test_sessions_wider_than_one_step_are_admitted_whole_and_interleave_with_decodes(tiny_engine):
    """Budget 256 tokens/step: 12 sessions of ~150 tokens enter over many steps, next to running decodes."""
    rng = random.Random(3)
    vocab = len(tiny_engine.tokenizer)
    cases = [[random_tokens(rng, vocab, rng.randint(20, 60)) for _ in range(3)] for _ in range(12)]
    config = FedAttnConfig(sync_interval=2, generators=(0, 2))  # participant 0 decodes over later ones' K/V
    results = tiny_engine.llm.generate([FedAttnSession(c, config, greedy(8)) for c in cases])
    for segments, result in zip(cases, results):
        assert {g: o.token_ids for g, o in result.outputs.items()} == \
            tiny_engine.oracle.generate(segments, config, 8, ignore_eos=True).tokens


BAD_SESSIONS = [
    ("segments", FedAttnSessionError, lambda: FedAttnSession([])),
    ("segments", FedAttnSessionError, lambda: FedAttnSession("one string")),
    ("segments[1]", FedAttnSessionError, lambda: FedAttnSession([[5, 6], []])),
    ("segments[0]", FedAttnSessionError, lambda: FedAttnSession([[5, 10**6]])),
    ("segments[0]", FedAttnSessionError, lambda: FedAttnSession([[5, -1]])),
    ("segments[1]", FedAttnSessionError, lambda: FedAttnSession([[5], [True]])),
    ("public_prefix", FedAttnSessionError, lambda: FedAttnSession([[5]], public_prefix=[5, 10**6])),
    ("public_prefix", FedAttnSessionError, lambda: FedAttnSession([[5]], public_prefix=3)),
    ("segments", FedAttnSessionError, lambda: FedAttnSession([[5] * 20], public_prefix=[5] * 240)),
    ("segments", FedAttnSessionError, lambda: FedAttnSession([[5] * 300])),  # > max_model_len
    ("segments", FedAttnSessionError, lambda: FedAttnSession([[5] * 20], sampling_params=greedy(250))),
    ("config", FedAttnSessionError, lambda: FedAttnSession([[5]], config={"sync_interval": 2})),
    ("sampling_params", FedAttnSessionError, lambda: FedAttnSession([[5]], sampling_params="greedy")),
    ("sampling_params.n", FedAttnSessionError, lambda: FedAttnSession([[5]], sampling_params=SamplingParams(n=2))),
    ("publisher", FedAttnConfigError, lambda: FedAttnSession([[5], [6]], FedAttnConfig(publisher=2))),
    ("generators", FedAttnConfigError, lambda: FedAttnSession([[5], [6]], FedAttnConfig(generators=(3,)))),
    ("kv_share_ratio", FedAttnConfigError, lambda: FedAttnSession([[5], [6]], FedAttnConfig(kv_share_ratio=(1.0,) * 3))),
    ("sync_layers", FedAttnConfigError,
     lambda: FedAttnSession([[5], [6]], FedAttnConfig(placement="explicit", sync_layers=[9]))),
]


@pytest.mark.parametrize("field,error,make", BAD_SESSIONS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_SESSIONS)])
def test_bad_sessions_raise_typed_errors_naming_the_field_before_anything_runs(tiny_engine, field, error, make):
    good = FedAttnSession([[5, 6, 7], [8, 9]], FedAttnConfig(sync_interval=2), greedy(3))
    with pytest.raises(error) as raised:
        tiny_engine.llm.generate([good, make()])
    assert raised.value.field == field
    assert tiny_engine.llm.engine.unfinished == 0 and len(REGISTRY) == 0
    assert tiny_engine.llm.generate([good])[0].error is None  # the engine is fine


@pytest.mark.parametrize("arg", ["enable_prefix_caching", "enable_chunked_prefill"])
def test_chunked_prefill_and_prefix_caching_are_refused_and_off(tiny_engine, arg):
    with pytest.raises(FedAttnEngineError) as raised:
        FederatedLLM(tiny_engine.name, **{arg: True})
    assert raised.value.field == arg
    config = tiny_engine.llm.llm.llm_engine.vllm_config
    assert not config.cache_config.enable_prefix_caching and not config.scheduler_config.enable_chunked_prefill


@pytest.fixture
def published(monkeypatch):
    """Weak references to every tensor published to the exchange during the test."""
    refs: list[weakref.ref] = []
    original = InProcessKVExchange.publish

    def publish(self, session, participant, layer, kv):
        refs.extend(weakref.ref(t) for t in kv)
        original(self, session, participant, layer, kv)

    monkeypatch.setattr(InProcessKVExchange, "publish", publish)
    return refs


def assert_nothing_left(refs: list[weakref.ref]) -> None:
    gc.collect()
    assert len(REGISTRY) == 0 and REGISTRY.exchange.live_sessions() == 0 and blocks_in_use() == 0
    assert refs and all(ref() is None for ref in refs), "published K/V outlived its session"


@pytest.mark.parametrize("h", [2, 1], ids=["H=2", "H=1: vLLM's own attention skipped"])
def test_a_failing_session_fails_alone_and_leaves_no_kv(tiny_engine, published, monkeypatch, h):
    """Fault injection at the exchange: the 4-participant session loses participant 1's K/V at layer 2."""
    original = InProcessKVExchange.fetch

    def fetch(self, session, viewer, source, layer):
        if source == 1 and layer == 2 and len(REGISTRY._sessions[session].lengths) == 4:
            raise KVExchangeError(f"participant {source}'s K/V at layer {layer} was lost")
        return original(self, session, viewer, source, layer)

    monkeypatch.setattr(InProcessKVExchange, "fetch", fetch)
    rng = random.Random(11)
    vocab, config = len(tiny_engine.tokenizer), FedAttnConfig(sync_interval=h)
    healthy = [[random_tokens(rng, vocab, 9) for _ in range(2)] for _ in range(3)]
    victim = [random_tokens(rng, vocab, 5) for _ in range(4)]
    results = tiny_engine.llm.generate([FedAttnSession(s, config, greedy(6)) for s in [healthy[0], victim, *healthy[1:]]])
    assert "was lost" in results[1].error and results[1].outputs == {}
    for segments, result in zip(healthy, [results[0], *results[2:]]):
        assert result.error is None
        assert result.outputs[1].token_ids == tiny_engine.oracle.generate(segments, config, 6, ignore_eos=True).tokens[1]
    assert_nothing_left(published)


def test_memory_returns_to_baseline_after_100_sessions(tiny_engine, published):
    """Exact: every published tensor is freed and no session state is left. Coarse: RSS stays flat.

    (Plain vLLM's own RSS creeps by a few MiB per hundred requests on CPU, hence the margin.)
    """
    rng = random.Random(7)
    vocab = len(tiny_engine.tokenizer)

    def batch() -> list[FedAttnSession]:
        return [FedAttnSession([random_tokens(rng, vocab, rng.randint(1, 30)) for _ in range(rng.randint(1, 4))],
                               FedAttnConfig(sync_interval=rng.randint(1, 3), generators=(0, -1)), greedy(4))
                for _ in range(100)]

    tiny_engine.llm.generate(batch())  # warm-up: allocator pools, caches
    assert_nothing_left(published)
    process = psutil.Process()
    baseline = process.memory_info().rss
    results = tiny_engine.llm.generate(batch())
    assert all(r.error is None for r in results)
    assert_nothing_left(published)
    growth = process.memory_info().rss - baseline
    print(f"\nRSS growth over 100 sessions: {growth / 2**20:.1f} MiB")
    assert growth < 64 * 2**20
