"""The pure math behind the detectors, checked against direct computations and hand-made series."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradscope.detect import functional as F

# Series of any length with NaN, ±inf, zeros, tiny and huge values mixed in.
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, 1e-30, 1e30, -1.0, math.nan, math.inf]),
)
series = st.lists(floats, min_size=0, max_size=80)


def test_log10_positive_maps_non_positive_and_non_finite_to_nan() -> None:
    out = F.log10_positive([100.0, 0.0, -1.0, math.nan, math.inf, 1e-3])
    np.testing.assert_allclose(out, [2.0, np.nan, np.nan, np.nan, np.nan, -3.0])


def test_robust_zscore_ignores_an_outlier() -> None:
    values = np.r_[np.random.default_rng(0).normal(10, 1, 500), 1e6]
    z = F.robust_zscore(values)
    assert abs(np.median(z[:-1])) < 0.1
    assert 0.8 < np.std(z[:-1]) < 1.2  # MAD·1.4826 estimates the std of normal data
    assert z[-1] > 1e5


def test_robust_center_scale_of_a_constant_uses_the_floor() -> None:
    assert F.robust_center_scale([3.0, 3.0, 3.0], min_scale=0.5) == (3.0, 0.5)
    assert all(math.isnan(v) for v in F.robust_center_scale([]))


def test_rolling_median_matches_a_direct_computation_and_skips_nan() -> None:
    values = np.array([1.0, 5.0, np.nan, 2.0, 8.0, 3.0])
    out = F.rolling_median(values, 3)
    expected = [1.0, 3.0, 3.0, 3.5, 5.0, 3.0]
    np.testing.assert_allclose(out, expected)


def test_trailing_jump_measures_decades_above_the_recent_level() -> None:
    values = np.r_[np.zeros(20), 3.0, np.zeros(5)]
    jump = F.trailing_jump(values, 10)
    assert jump[20] == pytest.approx(3.0)
    assert np.nanmax(np.abs(np.delete(jump, 20))) == 0


def test_centered_jump_sees_a_spike_at_the_first_step() -> None:
    values = np.r_[2.5, np.zeros(30)]  # a 300× spike at step 0, then a flat level
    jump = F.centered_jump(values, 10)
    assert jump[0] == pytest.approx(2.5)
    assert np.nanmax(jump[1:]) < 0.5


def test_runs_and_sustained_masks() -> None:
    mask = [False, True, True, False, True, True, True, False, True]
    assert F.runs_of_true(mask) == [(1, 2), (4, 3), (8, 1)]
    assert F.first_sustained(mask, 3) == 4
    assert F.first_sustained(mask, 4) == 8  # a run reaching the end counts: it may still be going on
    assert F.last_sustained_start(mask) == 8
    assert F.last_sustained_start(mask[:-1]) is None
    assert F.first_sustained([], 2) is None


def test_slope_of_a_line_and_of_too_little_data() -> None:
    assert F.slope([1.0, 3.0, 5.0, np.nan, 9.0]) == pytest.approx(2.0)
    assert math.isnan(F.slope([1.0]))
    assert F.slope([4.0, 4.0], x=[0.0, 10.0]) == 0


def test_plateau_start_is_where_the_curve_stopped_descending() -> None:
    curve = np.r_[np.linspace(1.0, 0.0, 50), np.zeros(30)]
    assert F.plateau_start(curve, 0.0, 0.05) == 47  # 1 - 47/49 = 0.041 is the first value within the band
    assert F.plateau_start(np.zeros(10), 0.0, 0.01) == 0


def test_depth_deficit_counts_decades_below_the_best_fed_later_layer() -> None:
    np.testing.assert_allclose(F.depth_deficit([-7.0, -5.0, -1.0, -2.0]), [6.0, 4.0, -1.0, np.nan])
    out = F.depth_deficit([-1.0, np.nan, -3.0])
    assert out[0] == pytest.approx(-2.0) and math.isnan(out[1]) and math.isnan(out[2])


def test_format_number_keeps_two_significant_digits() -> None:
    cases = {0.0012: "0.0012", 8.0: "8", 120.4: "120", 123456.0: "120000", 3.2e-5: "3.2e-05", 4.1e7: "4.1e+07", 0.0: "0"}
    for value, text in cases.items():
        assert F.format_number(value) == text
    assert F.format_number(math.nan) == "nan"


def test_transform_loss_uses_log_space_for_non_negative_losses() -> None:
    values, is_log = F.transform_loss([100.0, 10.0, 0.0, math.nan])
    assert is_log
    np.testing.assert_allclose(values, [2.0, 1.0, np.nan, np.nan])  # an exact 0 has no level in log space
    values, is_log = F.transform_loss([0.5, -1.0, -2.0, -2.5])
    assert not is_log and np.isfinite(values).all()


def test_loss_progress_of_a_converging_curve() -> None:
    loss = np.geomspace(2.3, 0.023, 300)  # two decades down
    p = F.loss_progress(loss)
    assert p.is_log and p.n == 300
    assert p.start == pytest.approx(math.log10(2.3), abs=0.01)  # the median of the first three values
    assert p.gain == pytest.approx(1.85, abs=0.1)
    assert p.regress == pytest.approx(0.0, abs=0.05)
    assert p.recent_change < 0


def test_loss_progress_sees_lost_progress() -> None:
    loss = np.r_[np.geomspace(2.3, 0.023, 200), np.full(100, 2.3)]
    p = F.loss_progress(loss)
    assert p.regress == pytest.approx(1.0, abs=0.05)


def test_loss_progress_starts_from_step_zero_when_the_first_steps_blow_up() -> None:
    loss = np.r_[2.3, 250.0, 5e5, 1e5, np.full(300, 2.35)]
    assert F.loss_progress(loss).start == pytest.approx(math.log10(2.3))


def test_loss_excursions_find_a_sustained_blow_up_and_ignore_one_spike() -> None:
    y = np.log10(np.r_[np.geomspace(2.3, 0.2, 100), 50.0, np.geomspace(0.2, 0.1, 50), np.full(10, 40.0), np.full(40, 0.1)])
    found = F.loss_excursions(y, window=20, threshold=1.0, min_points=2)
    assert len(found) == 1
    assert found[0].start == 151 and found[0].end == 160
    assert found[0].peak == pytest.approx(math.log10(40.0))


@settings(max_examples=150, deadline=None)
@given(series)
def test_functions_never_raise_on_arbitrary_series(values: list[float]) -> None:
    arr = np.asarray(values, dtype=np.float64)
    F.log10_positive(arr)
    F.robust_zscore(arr)
    F.rolling_median(arr, 5)
    F.trailing_jump(arr, 5)
    F.centered_jump(arr, 3)
    F.slope(arr)
    F.plateau_start(arr, 0.0, 0.1)
    F.depth_deficit(arr)
    F.nan_median(arr)
    F.nan_percentile(arr, 90)
    p = F.loss_progress(arr)
    assert p.n == int(np.isfinite(F.transform_loss(arr)[0]).sum())
    values_t, _ = F.transform_loss(arr)
    finite = values_t[np.isfinite(values_t)]
    F.loss_excursions(finite, window=5, threshold=1.0, min_points=2)
    for v in arr[:5]:
        F.format_number(float(v))
