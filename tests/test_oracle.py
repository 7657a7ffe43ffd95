"""The oracle against plain Hugging Face inference on the tiny random models (fp32)."""

import pytest
import torch
from torch.testing import assert_close

from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.oracle import FedAttnOracle, _Visibility
from fedattn_vllm.selection import kept_count

TEXT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nLet's think step by step\n"
NO_SYNC = FedAttnConfig(placement="explicit", sync_layers=())


def split(ids, *cuts):
    bounds = [0, *cuts, len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.fixture
def ids(tiny):
    return tiny[1](TEXT)["input_ids"]


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("config", [FedAttnConfig(sync_interval=1), FedAttnConfig(placement="explicit", sync_layers=list(range(6)))])
def test_every_layer_synced_equals_plain_hf(tiny, ids, config):
    model, _ = tiny
    out = FedAttnOracle(model).generate(split(ids, 1, 9, 20), config, 12, ignore_eos=True, output_prompt_logits=True)
    assert_close(out.prompt_logits, model(torch.tensor([ids])).logits[0], rtol=1e-5, atol=1e-5)
    assert out.tokens[3] == hf_greedy(model, ids, 12)


@pytest.mark.parametrize("interval", [1, 2, 4])
def test_one_participant_equals_plain_hf(tiny, ids, interval):
    model, _ = tiny
    out = FedAttnOracle(model).generate([ids], FedAttnConfig(sync_interval=interval), 12, ignore_eos=True,
                                        output_prompt_logits=True)
    assert_close(out.prompt_logits, model(torch.tensor([ids])).logits[0], rtol=1e-5, atol=1e-5)
    assert out.tokens[0] == hf_greedy(model, ids, 12)


def test_no_sync_equals_each_segment_alone_at_its_global_offset(tiny, ids):
    model, _ = tiny
    segments = split(ids, 7, 15)
    out = FedAttnOracle(model).generate(segments, NO_SYNC, 1, output_prompt_logits=True, output_hidden_states=True)
    offset = 0
    for seg in segments:
        positions = torch.arange(offset, offset + len(seg))[None]
        alone = model(torch.tensor([seg]), position_ids=positions, output_hidden_states=True)
        assert_close(out.prompt_logits[offset : offset + len(seg)], alone.logits[0], rtol=1e-5, atol=1e-5)
        assert_close(out.hidden_states[1, offset : offset + len(seg)], alone.hidden_states[1][0], rtol=1e-5, atol=1e-5)
        offset += len(seg)


def test_sync_matters_and_hidden_states_have_one_entry_per_layer(tiny, ids):
    model, _ = tiny
    segments = split(ids, 10, 20)
    oracle = FedAttnOracle(model)
    h2 = oracle.generate(segments, FedAttnConfig(sync_interval=2), 1, output_hidden_states=True).hidden_states
    h1 = oracle.generate(segments, FedAttnConfig(sync_interval=1), 1, output_hidden_states=True).hidden_states
    assert h2.shape == (7, len(ids), model.config.hidden_size)
    assert_close(h2[:, :10], h1[:, :10], rtol=1e-5, atol=1e-5)  # participant 1 sees only itself either way
    assert_close(h2[1], h1[1], rtol=1e-5, atol=1e-5)  # layer 0 syncs under both schedules
    assert not torch.allclose(h2[2, 10:], h1[2, 10:])  # layer 1 is local under H = 2


@pytest.mark.parametrize("config", [FedAttnConfig(sync_interval=2), FedAttnConfig(sync_interval=3, placement="back_half")])
def test_cached_decode_equals_recomputing_the_prompt(tiny, ids, config):
    """The last participant's generated tokens behave as an extension of its segment."""
    model, _ = tiny
    oracle = FedAttnOracle(model)
    segments = split(ids, 6, 18)
    out = oracle.generate(segments, config, 10, ignore_eos=True)
    tokens = out.tokens[2]
    extended = segments[:-1] + [segments[-1] + tokens[:-1]]
    full = oracle.generate(extended, config, 1, output_prompt_logits=True).prompt_logits
    assert full[len(ids) - 1 :].argmax(-1).tolist() == tokens
    assert_close(full[len(ids) - 1], out.first_logits[2])


def test_every_generator_decodes_from_its_own_state(tiny, ids):
    model, _ = tiny
    segments = split(ids, 6, 18)
    config = FedAttnConfig(sync_interval=2, generators=[0, 1, 2])
    out = FedAttnOracle(model).generate(segments, config, 8, ignore_eos=True)
    assert sorted(out.tokens) == [0, 1, 2] and all(len(t) == 8 for t in out.tokens.values())
    alone = FedAttnOracle(model).generate(segments[:1], FedAttnConfig(), 1, output_prompt_logits=True)
    assert_close(out.first_logits[0], alone.prompt_logits[-1])  # participant 1's prompt sees nobody
    single = FedAttnOracle(model).generate(segments, FedAttnConfig(sync_interval=2, generators=[1]), 8, ignore_eos=True)
    assert single.tokens[1] == out.tokens[1]


def test_one_token_segments(tiny, ids):
    model, _ = tiny
    out = FedAttnOracle(model).generate([ids[:1], ids[1:2], ids[2:]], FedAttnConfig(sync_interval=1), 6,
                                        ignore_eos=True)
    assert out.tokens[2] == hf_greedy(model, ids, 6)


def test_sparse_sharing_masks_follow_the_plan():
    plan = FedAttnConfig(sync_interval=2, kv_share_ratio=[0.5, 0.25, 1.0], seed=3).resolve(6, 3)
    lengths = [8, 8, 4]
    vis = _Visibility(plan, lengths)
    for layer in range(6):
        mask = vis.prefill_mask(layer)
        last_row = mask[-1]
        foreign = int(last_row[:16].sum())
        if layer % 2 == 0:
            shared = plan.shared_positions(0, layer, 8).tolist()
            assert torch.nonzero(last_row[:8]).flatten().tolist() == shared
            assert foreign == 4 + 2
        else:
            assert foreign == 0
        assert bool(last_row[16:].all())  # own tokens always
        assert mask.diagonal().all()
    # a generator sees the same shared subsets as everyone else, plus its own tokens
    decode = vis.decode_mask(2, generator=0, num_generated=3)
    assert decode.shape == (1, 23) and bool(decode[0, :8].all()) and int(decode[0, 8:16].sum()) == 2


def test_publisher_interval_reaches_other_generators():
    plan = FedAttnConfig(sync_interval=4, publisher_sync_interval=2, generators=[0]).resolve(8, 3)
    vis = _Visibility(plan, [3, 3, 3])
    at_publisher_only_layer = vis.decode_mask(2, generator=0, num_generated=1)[0]
    assert at_publisher_only_layer.tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [True]
    assert vis.decode_mask(4, generator=0, num_generated=1)[0].all()


def test_sparse_sharing_is_seeded(tiny, ids):
    model, _ = tiny
    oracle = FedAttnOracle(model)
    segments = split(ids, 10, 20)
    run = lambda **kw: oracle.generate(segments, FedAttnConfig(sync_interval=1, **kw), 1).first_logits[2]
    dense = run()
    assert_close(run(kv_share_ratio=1.0, seed=5), dense)
    sparse = run(kv_share_ratio=0.3, seed=5)
    assert_close(run(kv_share_ratio=0.3, seed=5), sparse)
    assert not torch.allclose(sparse, dense) and not torch.allclose(run(kv_share_ratio=0.3, seed=6), sparse)
    assert not torch.allclose(run(local_keep_ratio=0.5), dense)


def test_bad_segments(tiny):
    with pytest.raises(ValueError, match="segments"):
        FedAttnOracle(tiny[0]).generate([[1, 2], []], FedAttnConfig(), 1)


def test_a_last_publisher_generating_alone_reads_nobody_elses_copy_of_its_kv(tiny, ids):
    """Keeping the (last) question holder dense, or syncing it more often, changes nothing for its own answer:
    nobody after it reads its shared K/V. It matters only to other generators (the paper scores each)."""
    model, _ = tiny
    oracle = FedAttnOracle(model)
    segments = split(ids, 7, 14, 21)

    def first_logits(generators, **kw):
        out = oracle.generate(segments, FedAttnConfig(sync_interval=2, generators=generators, **kw), 1)
        return out.first_logits
    sparse = dict(kv_share_ratio=0.3, seed=3)
    alone, kept_dense = first_logits((3,), **sparse), first_logits((3,), kv_share_ratio=(0.3, 0.3, 0.3, 1.0), seed=3)
    assert_close(kept_dense[3], alone[3], rtol=0, atol=0)
    assert_close(first_logits((3,), publisher_sync_interval=1)[3], first_logits((3,))[3], rtol=0, atol=0)
    # participant 0's decode does read the publisher's K/V: 30% of its tokens, or all of them when kept dense
    lengths, publisher = [len(s) for s in segments], slice(21, None)
    visible = [int(_Visibility(FedAttnConfig(sync_interval=2, kv_share_ratio=r).resolve(2, 4), lengths)
                   .decode_mask(0, generator=0, num_generated=1)[0, :-1][publisher].sum())
               for r in (0.3, (0.3, 0.3, 0.3, 1.0))]
    assert visible == [kept_count(lengths[3], 0.3), lengths[3]]


# -- beyond the paper: the generator sync interval and the public prefix -------------------------------

def test_a_generator_reading_every_layer_with_one_other_participant_equals_plain_hf(tiny, ids):
    """N = 2, nobody syncs but the generator reads at every layer: participant 0 sees only itself in
    centralised inference too, so the generator's prefill and decode are exactly centralised."""
    model, _ = tiny
    config = FedAttnConfig(placement="explicit", sync_layers=(), generator_sync_interval=1)
    out = FedAttnOracle(model).generate(split(ids, 11), config, 12, ignore_eos=True, output_prompt_logits=True)
    assert_close(out.prompt_logits, model(torch.tensor([ids])).logits[0], rtol=1e-5, atol=1e-5)
    assert out.tokens[1] == hf_greedy(model, ids, 12)
    assert out.sync_layers == tuple(range(6))


def test_generator_layers_are_read_by_generators_only():
    plan = FedAttnConfig(sync_interval=4, generator_sync_interval=2, generators=[2]).resolve(8, 3)
    vis = _Visibility(plan, [3, 3, 3])
    prefill = vis.prefill_mask(2)  # a generator layer, not a sync layer
    assert not prefill[3:6, :3].any()  # participant 1 does not generate: it reads nobody there
    assert prefill[6:9, :6].all()  # the generator reads both earlier participants
    assert vis.decode_mask(2, generator=2, num_generated=1)[0].all()
    assert not vis.prefill_mask(1)[6:9, :6].any()  # a local layer for everyone
    # participant 2 generates alone: nobody reads it at generator layers, so it publishes only at S
    assert plan.publish_layers == (frozenset({0, 2, 4, 6}),) * 2 + (frozenset({0, 4}),)
    assert [plan.reads(1, 0, l) for l in range(4)] == [True, False, False, False]
    assert [plan.reads(2, 0, l) for l in range(4)] == [True, False, True, False]


@pytest.mark.parametrize("config", [FedAttnConfig(sync_interval=1), FedAttnConfig(sync_interval=3)])
def test_a_public_prefix_with_every_layer_synced_or_one_participant_equals_plain_hf(tiny, ids, config):
    model, _ = tiny
    prefix, rest = ids[:5], ids[5:]
    segments = split(rest, 4, 10) if config.sync_interval == 1 else [rest]
    out = FedAttnOracle(model).generate(segments, config, 10, ignore_eos=True, output_prompt_logits=True,
                                        public_prefix=prefix)
    assert_close(out.prompt_logits, model(torch.tensor([ids])).logits[0], rtol=1e-5, atol=1e-5)
    assert out.tokens[len(segments) - 1] == hf_greedy(model, ids, 10)


def test_the_public_prefix_is_seen_by_everyone_at_every_layer_and_sees_only_itself():
    plan = FedAttnConfig(placement="explicit", sync_layers=(), kv_share_ratio=0.5).resolve(4, 2)
    vis = _Visibility(plan, [3, 4], prefix_len=2)
    for layer in range(4):
        mask = vis.prefill_mask(layer)
        assert mask[:, :2].tril().equal(torch.ones(9, 2, dtype=torch.bool).tril())  # everyone sees the prefix
        assert not mask[:2, 2:].any()
        assert not mask[5:, 2:5].any()  # no sync: participant 1 never sees participant 0
        assert vis.decode_mask(layer, generator=1, num_generated=1)[0].tolist() == [True] * 2 + [False] * 3 + [True] * 5


def test_a_no_sync_prefix_participant_equals_prefix_plus_its_segment_alone(tiny, ids):
    model, _ = tiny
    prefix, segments = ids[:4], split(ids[4:], 6)
    out = FedAttnOracle(model).generate(segments, NO_SYNC, 1, output_prompt_logits=True, public_prefix=prefix)
    alone = torch.tensor([prefix + segments[1]])
    positions = torch.tensor([list(range(4)) + list(range(10, len(ids)))])
    expected = model(alone, position_ids=positions).logits[0, 4:]
    assert_close(out.prompt_logits[10:], expected, rtol=1e-5, atol=1e-5)
