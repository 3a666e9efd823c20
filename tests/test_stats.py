"""Tests of core/stats.py against values derived by hand."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from core.stats import bootstrap, mean, pearson, wilson

# -- Wilson interval ---------------------------------------------------------------------------
# centre = (p + z^2/2n) / (1 + z^2/n), half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n); z = 2 keeps it exact.


def test_wilson_hand_values():
    # 8 of 16: z^2/n = 1/4, centre = (1/2 + 1/8) / (5/4) = 1/2,
    # half = 2 sqrt(1/64 + 1/256) / (5/4) = 2 (sqrt(5)/16) (4/5) = sqrt(5)/10.
    assert wilson(8, 16, z=2) == pytest.approx((0.5, 0.5 - math.sqrt(5) / 10, 0.5 + math.sqrt(5) / 10))
    # 3 of 4: z^2/n = 1, centre = (3/4 + 1/2) / 2 = 5/8, pulled from p towards 1/2;
    # half = 2 sqrt(3/64 + 4/64) / 2 = sqrt(7)/8.
    assert wilson(3, 4, z=2) == pytest.approx((0.75, 5 / 8 - math.sqrt(7) / 8, 5 / 8 + math.sqrt(7) / 8))


def test_wilson_at_zero_and_all_successes():
    # p = 0: half = centre = (z^2/2n) / (1 + z^2/n), so the interval is [0, z^2 / (n + z^2)] = [0, 4/8];
    # p = 1 mirrors it. The bounds are exactly 0 and 1, not a rounding error past them.
    assert wilson(0, 4, z=2) == pytest.approx((0.0, 0.0, 0.5))
    assert wilson(4, 4, z=2) == pytest.approx((1.0, 0.5, 1.0))
    assert wilson(0, 10)[1] == 0.0 and wilson(10, 10)[2] == 1.0
    assert wilson(0, 10)[2] == pytest.approx(1.96 ** 2 / (10 + 1.96 ** 2))
    assert all(math.isnan(v) for v in wilson(0, 0))


# -- percentile bootstrap ----------------------------------------------------------------------


def test_bootstrap_takes_the_2_5_and_97_5_percentiles_of_the_resampled_statistic():
    # A statistic that returns 0, 1, 2, ... on successive calls: the 1000 resamples give 0..999 and
    # the whole sample, called last, 1000. The interval leaves 25 resample values below it, 25 above.
    counter = itertools.count()
    assert bootstrap([1.0, 2.0], statistic=lambda _: next(counter), samples=1000) == (1000, 25, 974)


def test_bootstrap_hand_value_on_two_points():
    # Resamples of [0, 1] have mean 0, 1/2 or 1 with chances 1/4, 1/2, 1/4: far more than 2.5% of
    # them are 0 and 1, so the interval is the whole range.
    assert bootstrap([0.0, 1.0]) == (0.5, 0.0, 1.0)
    assert bootstrap([3.0] * 5) == (3.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in bootstrap([]))


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_data():
    rng = random.Random(0)
    widths = []
    for n in (20, 2000):
        values = [rng.gauss(1.0, 1.0) for _ in range(n)]
        point, low, high = bootstrap(values)
        assert point == pytest.approx(mean(values)) and low < point < high
        widths.append(high - low)
    # The width goes as 1/sqrt(n): 100 times the data, about a tenth of the width.
    assert widths[1] < widths[0] / 5, widths
    assert bootstrap(values, seed=1) != bootstrap(values, seed=2)  # the seed is used
    assert bootstrap(values, seed=1) == bootstrap(values, seed=1)


# -- Pearson correlation -----------------------------------------------------------------------


def test_pearson_hand_values():
    # x = [1, 2, 3], y = [1, 3, 2]: deviations [-1, 0, 1] and [-1, 1, 0], so sxy = 1, sxx = syy = 2,
    # r = 1 / sqrt(2 * 2) = 1/2.
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_pearson_is_none_where_undefined_and_refuses_unequal_lengths():
    assert pearson([], []) is None and pearson([1.0], [2.0]) is None  # fewer than 2 points
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1, 2, 3], [5, 5, 5]) is None  # a constant side
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        pearson([1, 2, 3], [1, 2])
