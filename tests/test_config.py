import dataclasses
import random

import pytest

from fedattn_vllm.config import RECOMMENDED, FedAttnConfig, FedAttnConfigError, KVWire
from fedattn_vllm.schedule import Placement


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sync_interval": 0}, "sync_interval"),
        ({"sync_interval": 2.5}, "sync_interval"),
        ({"sync_interval": True}, "sync_interval"),
        ({"placement": "middle"}, "placement"),
        ({"placement": "explicit"}, "sync_layers"),
        ({"placement": "explicit", "sync_layers": [1, 1]}, "sync_layers"),
        ({"placement": "explicit", "sync_layers": [-1]}, "sync_layers"),
        ({"placement": "explicit", "sync_layers": "0,4"}, "sync_layers"),
        ({"sync_layers": [0, 4]}, "sync_layers"),
        ({"kv_share_ratio": 0.0}, "kv_share_ratio"),
        ({"kv_share_ratio": 1.5}, "kv_share_ratio"),
        ({"kv_share_ratio": float("nan")}, "kv_share_ratio"),
        ({"kv_share_ratio": "half"}, "kv_share_ratio"),
        ({"kv_share_ratio": []}, "kv_share_ratio"),
        ({"kv_share_ratio": [0.5, 0]}, "kv_share_ratio"),
        ({"kv_selection": "psychic"}, "kv_selection"),
        ({"kv_wire": "int3"}, "kv_wire"),
        ({"local_keep_ratio": 0}, "local_keep_ratio"),
        ({"local_keep_ratio": 0.5, "kv_selection": "question"}, "local_keep_ratio"),
        ({"publisher": "last"}, "publisher"),
        ({"publisher_sync_interval": 0}, "publisher_sync_interval"),
        ({"placement": "explicit", "sync_layers": [0], "publisher_sync_interval": 2}, "publisher_sync_interval"),
        ({"generators": []}, "generators"),
        ({"generators": 3}, "generators"),
        ({"generators": ["a"]}, "generators"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**63}, "seed"),  # seeds reach torch and vLLM as signed 64-bit integers
        ({"seed": -1}, "seed"),
        ({"sync_interval": 2**70}, "sync_interval"),  # every integer of the config is bounded
        ({"generator_sync_interval": 2**21}, "generator_sync_interval"),
        ({"publisher": 2**40}, "publisher"),
        ({"placement": "explicit", "sync_layers": [2**40]}, "sync_layers"),
        ({"generator_sync_interval": 0}, "generator_sync_interval"),
        ({"generator_sync_interval": True}, "generator_sync_interval"),
        ({"generator_sync_interval": 1.0}, "generator_sync_interval"),
    ],
)
def test_each_bad_field_raises_an_error_naming_it(kwargs, field):
    with pytest.raises(FedAttnConfigError) as info:
        FedAttnConfig(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    "kwargs, depth, n, field",
    [
        ({"placement": "explicit", "sync_layers": [0, 6]}, 6, 2, "sync_layers"),
        ({"kv_share_ratio": [0.5, 0.5]}, 6, 3, "kv_share_ratio"),
        ({"generators": [3]}, 6, 3, "generators"),
        ({"generators": [-4]}, 6, 3, "generators"),
        ({"publisher": 5}, 6, 3, "publisher"),
        ({}, 6, 0, "participants"),
        ({}, 0, 2, "num_layers"),
    ],
)
def test_resolve_checks_fields_against_the_model_and_session(kwargs, depth, n, field):
    with pytest.raises(FedAttnConfigError) as info:
        FedAttnConfig(**kwargs).resolve(depth, n)
    assert info.value.field == field


def test_defaults_and_normalisation():
    config = FedAttnConfig(placement="front_half", generators=[0, -1], kv_share_ratio=[1, 0.5])
    assert config.placement is Placement.FRONT_HALF
    assert config.generators == (0, -1) and config.kv_share_ratio == (1.0, 0.5)
    plan = config.resolve(num_layers=8, num_participants=2)
    assert plan.generators == (0, 1) and plan.publisher == 1
    assert plan.share_ratios == (1.0, 0.5)
    default = FedAttnConfig().resolve(24, 4)
    assert default.generators == (3,) and default.sync_layers == (0, 4, 8, 12, 16, 20)


def test_config_is_frozen_and_hashable():
    config = FedAttnConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sync_interval = 2
    assert hash(config) == hash(FedAttnConfig())


def test_publisher_shares_on_its_own_interval():
    plan = FedAttnConfig(sync_interval=4, publisher_sync_interval=2).resolve(12, 3)
    assert plan.publish_layers[2] == {0, 2, 4, 6, 8, 10}
    assert plan.publish_layers[0] == plan.publish_layers[1] == {0, 4, 8}
    assert plan.sync_layers == (0, 2, 4, 6, 8, 10)
    assert plan.publishes(2, 2) and not plan.publishes(0, 2)


def test_plan_selects_shared_and_kept_positions():
    plan = FedAttnConfig(kv_share_ratio=[1.0, 0.3], local_keep_ratio=0.5, seed=7).resolve(4, 2)
    assert plan.shared_positions(0, 0, 10) is None  # ratio 1.0: everything
    shared = plan.shared_positions(1, 0, 10)
    assert shared.tolist() == sorted(set(shared.tolist())) and len(shared) == 3
    assert plan.shared_count(1, 10) == 3
    assert len(plan.kept_positions(0, 1, 10)) == 5


def test_a_config_round_trips_through_its_plain_dict():
    config = FedAttnConfig(placement="explicit", sync_layers=[3, 1], kv_share_ratio=[0.5, 1.0], kv_wire="int8",
                           generators=[0, -1], generator_sync_interval=2)
    assert FedAttnConfig(**config.to_dict()) == config
    assert config.to_dict()["placement"] == "explicit" and config.to_dict()["sync_layers"] == [1, 3]


def test_generators_read_at_their_interval_and_everyone_publishes_there_if_read():
    plan = FedAttnConfig(placement="explicit", sync_layers=(), generator_sync_interval=1, generators=[1]).resolve(4, 3)
    assert plan.sync_layers == (0, 1, 2, 3)
    assert plan.publish_layers == (frozenset(range(4)), frozenset(), frozenset(range(4)))  # nobody reads the lone generator
    assert plan.sees(1, 0, 3, prefill=True) and not plan.sees(2, 0, 3, prefill=True)  # participant 2 does not generate
    assert plan.sees(1, 2, 3, prefill=False) and not plan.sees(1, 2, 3, prefill=True)  # later ones only in decode
    assert not plan.sees(1, 1, 0, prefill=False)  # own tokens are not foreign


def test_the_eval_cli_offers_every_wire():
    from fedattn_vllm.eval.cli import WIRES

    assert WIRES == tuple(w.value for w in KVWire)


def test_any_values_give_a_config_or_an_error_naming_the_field():
    """What arrives from outside (the server's fedattn block, a coordinator's open) never raises anything else."""
    rng = random.Random(0)
    values = [None, 0, -1, 2, 2**62, 1.5, float("nan"), float("inf"), "", "x", "explicit", "question", "k4v2", [], [0],
              [1, 2], [-1], {}, {"a": 1}, True, b"x", [[1]], [None], ["a"], 0.5, [0.5, 2]]
    names = [f.name for f in dataclasses.fields(FedAttnConfig)]
    for _ in range(5000):
        kwargs = {name: rng.choice(values) for name in rng.sample(names, rng.randint(1, 6))}
        try:
            FedAttnConfig(**kwargs).resolve(24, rng.randint(1, 5))
        except FedAttnConfigError as error:
            assert error.field in names or error.field == "participants", (kwargs, error)


def test_the_recommended_setting_is_the_measured_one_every_layer_synced_with_k4v2():
    """RESULTS.md measured H=1 with k4v2 (no H_g); RECOMMENDED adds H_g=1, which must change nothing at H=1."""
    measured = FedAttnConfig(sync_interval=1, kv_wire="k4v2")
    assert RECOMMENDED.kv_wire is KVWire.K4V2
    for depth, n in [(24, 2), (24, 6), (5, 3)]:
        ours, theirs = RECOMMENDED.resolve(depth, n), measured.resolve(depth, n)
        assert ours.publish_layers == theirs.publish_layers and ours.sync_layers == theirs.sync_layers
        assert all(ours.sees(v, s, layer, prefill) == theirs.sees(v, s, layer, prefill)
                   for v in range(n) for s in range(n) for layer in range(depth) for prefill in (True, False))
