"""Display downsampling keeps the extremes and the non-finite events of a series."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradscope.reporting import downsample
from gradscope.reporting.downsample import bucket_matrix, bucket_starts, envelope, nonfinite_marks


def test_bucket_starts_split_evenly() -> None:
    starts = bucket_starts(10, 3)
    assert starts.tolist() == [0, 3, 6]
    assert bucket_starts(5, 10).tolist() == [0, 1, 2, 3, 4]
    sizes = np.diff(np.append(bucket_starts(100_003, 600), 100_003))
    assert sizes.min() >= 166 and sizes.max() <= 167
    with pytest.raises(ValueError, match="n_buckets >= 1"):
        bucket_starts(10, 0)


def test_short_series_pass_through_with_nonfinite_as_gaps() -> None:
    steps = np.arange(5)
    x, y = envelope(steps, np.array([1.0, np.inf, 3.0, np.nan, -np.inf]), max_points=10)
    assert x.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(y, [1.0, np.nan, 3.0, np.nan, np.nan])


def test_a_one_step_spike_survives_at_its_step_and_height() -> None:
    steps = np.arange(100_000)
    values = np.ones(100_000)
    values[54_321] = 1e4
    values[77_777] = 1e-6
    x, y = envelope(steps, values, max_points=1000)
    assert len(x) <= 1000
    assert y.max() == 1e4 and x[np.argmax(y)] == 54_321
    assert y.min() == 1e-6 and x[np.argmin(y)] == 77_777
    assert np.all(np.diff(x) > 0)  # a line in step order


def test_a_bucket_of_only_nan_breaks_the_line() -> None:
    values = np.ones(1000)
    values[400:600] = np.nan
    x, y = envelope(np.arange(1000), values, max_points=20)  # 10 buckets of 100
    gaps = x[np.isnan(y)]
    assert gaps.tolist() == [400, 500]
    assert np.isfinite(y[(x < 400) | (x >= 600)]).all()


@settings(max_examples=60, deadline=None)
@given(
    values=arrays(np.float64, st.integers(1, 3000), elements=st.floats(allow_nan=True, allow_infinity=True, width=32)),
    max_points=st.integers(2, 500),
)
def test_envelope_keeps_the_extremes_of_any_series(values: np.ndarray, max_points: int) -> None:
    steps = np.arange(len(values)) * 3
    x, y = envelope(steps, values, max_points)
    assert len(x) <= max_points
    assert set(x.tolist()) <= set(steps.tolist())
    finite = values[np.isfinite(values)]
    if len(finite):
        assert np.nanmax(y) == finite.max()
        assert np.nanmin(y) == finite.min()
    else:
        assert np.isnan(y).all()


def test_nonfinite_marks_count_per_bucket() -> None:
    values = np.ones(1000)
    values[[10, 11, 12]] = np.nan
    values[505] = np.inf
    values[990] = -np.inf
    marks = nonfinite_marks(np.arange(1000) + 100, values, max_marks=10)
    assert marks.total == 5 and marks.first_step == 110
    assert marks.steps.tolist() == [110, 605, 1090]
    assert marks.last_steps.tolist() == [112, 605, 1090]
    assert marks.counts.tolist() == [3, 1, 1]
    assert marks.n_nan.tolist() == [3, 0, 0] and marks.n_inf.tolist() == [0, 1, 1]


def test_nonfinite_marks_of_a_finite_series_are_empty() -> None:
    marks = nonfinite_marks(np.arange(10), np.ones(10))
    assert len(marks) == 0 and marks.total == 0 and marks.first_step is None


def test_bucket_matrix_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.random((1000, 4))
    matrix[123, 2] = np.inf
    matrix[124, 2] = np.nan
    buckets = bucket_matrix(np.arange(1000), matrix, max_buckets=8)
    starts = bucket_starts(1000, 8)
    ends = np.append(starts[1:], 1000)
    for b, (s, e) in enumerate(zip(starts, ends, strict=True)):
        block = matrix[s:e]
        finite = np.where(np.isfinite(block), block, np.nan)
        np.testing.assert_array_equal(buckets.lo[b], np.nanmin(finite, axis=0))
        np.testing.assert_array_equal(buckets.hi[b], np.nanmax(finite, axis=0))
        np.testing.assert_array_equal(buckets.nonfinite[b], (~np.isfinite(block)).sum(axis=0))
    assert buckets.first_steps.tolist() == starts.tolist()
    assert buckets.last_steps.tolist() == (ends - 1).tolist()
    np.testing.assert_array_equal(buckets.centers, (starts + ends - 1) / 2)


def test_bucket_matrix_tells_missing_from_nonfinite() -> None:
    matrix = np.array([[1.0, np.nan], [np.inf, np.nan], [2.0, 3.0]])
    buckets = bucket_matrix(np.arange(3), matrix, max_buckets=1, missing=np.isnan(matrix))
    assert buckets.nonfinite.tolist() == [[1, 0]]
    assert buckets.present.tolist() == [[3, 1]]
    assert buckets.hi.tolist() == [[2.0, 3.0]]


def test_bucket_matrix_of_float32_values_in_column_blocks_matches_a_direct_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    # A run's stored float32 values, read a few columns at a time, as the report reads a long run.
    monkeypatch.setattr(downsample, "_BLOCK_VALUES", 1000)  # 2 columns per block of 500 rows
    rng = np.random.default_rng(1)
    matrix = rng.lognormal(0, 3, (500, 9)).astype(np.float32)
    matrix[rng.random(matrix.shape) < 0.1] = np.nan
    matrix[rng.random(matrix.shape) < 0.05] = np.inf
    missing = np.isnan(matrix) & (rng.random(matrix.shape) < 0.5)
    buckets = bucket_matrix(np.arange(500), matrix, max_buckets=37, missing=missing)
    starts = bucket_starts(500, 37)
    ends = np.append(starts[1:], 500)
    for b, (s, e) in enumerate(zip(starts, ends, strict=True)):
        block = matrix[s:e].astype(np.float64)
        finite = np.where(np.isfinite(block), block, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
            np.testing.assert_array_equal(buckets.lo[b], np.nanmin(finite, axis=0))
            np.testing.assert_array_equal(buckets.hi[b], np.nanmax(finite, axis=0))
        np.testing.assert_array_equal(buckets.nonfinite[b], (~np.isfinite(block) & ~missing[s:e]).sum(axis=0))
        np.testing.assert_array_equal(buckets.present[b], (~missing[s:e]).sum(axis=0))
    assert buckets.lo.dtype == buckets.hi.dtype == np.float64
