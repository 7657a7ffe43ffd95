"""Sync-layer placement policies: which layers of an M-layer model synchronise.

Every policy places the same number of sync layers as the uniform schedule,
K = |{l in [0, M) : l % H == 0}| = ceil(M / H), exactly as the spec defines them.
"""

from __future__ import annotations

import math
from enum import Enum


class Placement(str, Enum):
    UNIFORM = "uniform"  # l % H == 0
    FRONT_HALF = "front_half"  # K points evenly spaced in [0, M/2)
    BACK_HALF = "back_half"  # mirror image of front_half: M-1-x
    INCREASING = "increasing"  # gaps weighted 1, 2, 3, ... from 0 to M-1
    DECREASING = "decreasing"  # gaps weighted ..., 3, 2, 1 from 0 to M-1
    EXPLICIT = "explicit"  # a given list of layers


def num_sync_layers(num_layers: int, interval: int) -> int:
    """K: how many layers the uniform schedule with interval H syncs."""
    return math.ceil(num_layers / interval)


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # round half up, unlike Python's banker's round()


def _strictly_increasing(points: list[int], lo: int, hi: int) -> list[int]:
    """Push rounded points apart so K distinct layers stay within [lo, hi]."""
    out = list(points)
    floor = lo
    for i, p in enumerate(out):  # forward: at least one past the previous point
        out[i] = floor = max(p, floor)
        floor += 1
    ceiling = hi
    for i in reversed(range(len(out))):  # backward: leave room for the points after it
        out[i] = ceiling = min(out[i], ceiling)
        ceiling -= 1
    return out


def _front_half(num_layers: int, k: int) -> list[int]:
    half = max(num_layers // 2, k)  # a schedule denser than half the depth spills over
    return _strictly_increasing([(i * half) // k for i in range(k)], 0, num_layers - 1)


def _increasing_gaps(num_layers: int, k: int) -> list[int]:
    if k == 1:
        return [0]
    total = k * (k - 1) // 2  # gaps 1, 2, ..., k-1
    raw = [_round((num_layers - 1) * (i * (i + 1) // 2) / total) for i in range(k)]
    return _strictly_increasing(raw, 0, num_layers - 1)


def resolve_sync_layers(
    num_layers: int,
    interval: int,
    placement: Placement | str = Placement.UNIFORM,
    explicit: tuple[int, ...] | None = None,
) -> tuple[int, ...]:
    """The sorted sync layers of a `num_layers`-deep model (validated inputs assumed)."""
    placement = Placement(placement)
    if placement is Placement.EXPLICIT:
        assert explicit is not None
        return tuple(sorted(set(explicit)))
    k = num_sync_layers(num_layers, interval)
    if placement is Placement.UNIFORM:
        points = list(range(0, num_layers, interval))
    elif placement is Placement.FRONT_HALF:
        points = _front_half(num_layers, k)
    elif placement is Placement.BACK_HALF:
        points = sorted(num_layers - 1 - x for x in _front_half(num_layers, k))
    elif placement is Placement.INCREASING:
        points = _increasing_gaps(num_layers, k)
    else:  # DECREASING: the mirror image of increasing gaps
        points = sorted(num_layers - 1 - x for x in _increasing_gaps(num_layers, k))
    assert len(set(points)) == k and all(0 <= p < num_layers for p in points)
    return tuple(points)
