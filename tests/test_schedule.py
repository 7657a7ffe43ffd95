import math

import pytest

from fedattn_vllm.config import FedAttnConfig
from fedattn_vllm.schedule import Placement, resolve_sync_layers

PAPER_DEPTH_24_H4 = {
    "uniform": (0, 4, 8, 12, 16, 20),
    "front_half": (0, 2, 4, 6, 8, 10),
    "back_half": (13, 15, 17, 19, 21, 23),
    "increasing": (0, 2, 5, 9, 15, 23),  # gaps 2, 3, 4, 6, 8: weights 1..5 scaled to 23
    "decreasing": (0, 8, 14, 18, 21, 23),  # the mirror image
}


@pytest.mark.parametrize("placement, expected", PAPER_DEPTH_24_H4.items())
def test_depth_24_interval_4(placement, expected):
    assert FedAttnConfig(sync_interval=4, placement=placement).sync_layers_for(24) == expected


@pytest.mark.parametrize("interval, count", [(1, 24), (2, 12), (3, 8), (4, 6), (6, 4), (8, 3), (12, 2), (18, 2), (24, 1)])
def test_uniform_counts_for_the_paper_grid(interval, count):
    layers = FedAttnConfig(sync_interval=interval).sync_layers_for(24)
    assert len(layers) == count and layers[0] == 0 and all(l % interval == 0 for l in layers)


@pytest.mark.parametrize("placement", [p for p in Placement if p is not Placement.EXPLICIT])
def test_every_policy_places_the_uniform_count_of_distinct_layers(placement):
    for depth in range(1, 41):
        for interval in range(1, depth + 1):
            layers = resolve_sync_layers(depth, interval, placement)
            assert len(layers) == math.ceil(depth / interval), (depth, interval)
            assert list(layers) == sorted(set(layers)) and 0 <= layers[0] and layers[-1] < depth
            if interval == 1:
                assert layers == tuple(range(depth))


@pytest.mark.parametrize("placement", ["increasing", "decreasing"])
def test_gap_policies_span_the_whole_depth(placement):
    layers = resolve_sync_layers(28, 4, placement)
    assert layers[0] == 0 and layers[-1] == 27
    gaps = [b - a for a, b in zip(layers, layers[1:])]
    assert gaps == sorted(gaps, reverse=placement == "decreasing")


def test_front_and_back_half_stay_in_their_half():
    assert max(resolve_sync_layers(28, 4, "front_half")) < 14
    assert min(resolve_sync_layers(28, 4, "back_half")) >= 14


def test_explicit_and_empty_schedules():
    assert FedAttnConfig(placement="explicit", sync_layers=[5, 1, 3]).sync_layers_for(6) == (1, 3, 5)
    assert FedAttnConfig(placement="explicit", sync_layers=()).sync_layers_for(6) == ()
