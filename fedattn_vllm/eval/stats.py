"""Accuracy statistics: a 95% confidence interval (Wilson score: sound at small n and near 0 or 1), and an exact
paired test of two settings on the same problems (McNemar)."""

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


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value for two settings scored on the same problems.

    only_first / only_second: problems only the first / only the second got right. Under "equally accurate" each
    such discordant problem is a fair coin, so p = P(a Binomial(n, 1/2) is at least as lopsided), n = their sum.
    """
    if only_first < 0 or only_second < 0:
        raise ValueError("only_first, only_second: counts must be non-negative")
    n, k = only_first + only_second, min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)
