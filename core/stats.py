"""The statistics behind every claim the project makes: rates, intervals, correlations.

Wilson intervals for rates (small n and rates near 0 or 1 are common here), percentile bootstrap
intervals for everything else, Pearson correlation. Plain Python: the inputs are a few thousand numbers.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """A rate and its Wilson score interval (95% for z = 1.96); NaNs when n = 0."""
    if n == 0:
        return (float("nan"),) * 3
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At p = 0 or 1 rounding can put a bound a hair on the wrong side of p (or of [0, 1]).
    return p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def bootstrap(values: Sequence[float], statistic: Callable[[list], float] = mean, samples: int = 1000,
              seed: int = 0) -> tuple[float, float, float]:
    """A statistic of `values` with its 95% percentile bootstrap interval (values resampled with
    replacement, `samples` times, from `seed`); NaNs when there are no values."""
    values = list(values)
    if not values:
        return (float("nan"),) * 3
    rng = random.Random(seed)
    stats = sorted(statistic([values[rng.randrange(len(values))] for _ in values]) for _ in range(samples))
    return statistic(values), stats[int(0.025 * samples)], stats[int(0.975 * samples) - 1]


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's correlation; None when undefined (fewer than 2 points or a constant side), since JSON
    has no NaN."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        return None
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
