"""The helpers the built-in detectors share: the robust trend of a curve's tail."""

from __future__ import annotations

import math

import numpy as np

from gradscope.detect.rules._common import tail_trend


def test_tail_trend_reads_the_slope_of_the_last_two_windows() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(300)
    y = np.where(x < 200, 1.0 - 0.01 * x, -1.0 - 0.002 * (x - 200)) + rng.normal(0, 0.05, 300)
    trend = tail_trend(y, 50)  # the last 100 points only: the slow part
    assert trend.points == 100
    assert abs(trend.change - (-0.002 * 50)) < 3 * trend.stderr
    assert trend.stderr < 0.02


def test_tail_trend_standard_error_matches_the_spread_of_trends_of_pure_noise() -> None:
    rng = np.random.default_rng(1)
    z = []
    for _ in range(400):
        trend = tail_trend(rng.normal(0, 0.1, 200), 30)
        z.append(trend.change / trend.stderr)
    assert 0.85 < float(np.std(z)) < 1.2


def test_tail_trend_ignores_a_single_outlier_batch() -> None:
    y = np.random.default_rng(2).normal(0, 0.05, 100)
    y[-100] = 5.0  # one huge loss at the start of the tail
    trend = tail_trend(y, 50)
    assert abs(trend.change) < 3 * trend.stderr


def test_tail_trend_error_is_at_least_the_given_noise_and_needs_three_points() -> None:
    flat = np.zeros(40)
    assert tail_trend(flat, 20).stderr == 0.0
    floored = tail_trend(flat, 20, min_noise=0.1)
    assert floored.stderr > 0 and floored.change == 0.0
    assert math.isnan(tail_trend([1.0, math.nan, 2.0], 5).change)


def test_tail_trend_of_a_long_tail_thins_it_and_keeps_the_slope() -> None:
    y = -1e-4 * np.arange(3000) + np.random.default_rng(3).normal(0, 0.05, 3000)
    trend = tail_trend(y, 500)  # 1,000 points, thinned to 500 for the pairwise slopes
    assert trend.points == 1000
    assert abs(trend.change - (-0.05)) < 3 * trend.stderr
