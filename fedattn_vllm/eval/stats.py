"""Accuracy with a 95% confidence interval (Wilson score interval: sound at small n and near 0 or 1)."""

from __future__ import annotations

import math


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """(low, high) of the binomial proportion correct/total at the confidence of `z` (95%)."""
    if total <= 0:
        raise ValueError("total: need at least one trial")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # The bounds are exactly 0 and 1 at the ends; the formula leaves rounding noise there (1e-18 at 0/300).
    low = 0.0 if correct == 0 else centre - half
    high = 1.0 if correct == total else centre + half
    return low, high
