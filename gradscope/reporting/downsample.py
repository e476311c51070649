"""Shrink long series for display without hiding what matters in them.

A 100,000-step run cannot be drawn point by point in a browser, and plain decimation (every
k-th step) drops exactly the rare spikes a reader is looking for. These functions split the steps
into equal buckets and keep, per bucket, the minimum and the maximum (an *envelope*), so that a
one-step spike or collapse still reaches its true height on screen. Non-finite values (NaN/Inf)
cannot be drawn at all, and a plot silently leaves a gap where they are, so they are counted and
returned separately for the report to mark explicitly.

All functions are pure numpy: ``steps`` is a sorted ``(n,)`` integer array and values are float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BucketedMatrix", "NonFiniteMarks", "bucket_matrix", "bucket_starts", "envelope", "nonfinite_marks"]


def bucket_starts(n: int, n_buckets: int) -> np.ndarray:
    """Start indices of at most ``n_buckets`` contiguous buckets of near-equal size covering ``range(n)``.

    With ``n <= n_buckets`` every index is its own bucket.
    """
    if n_buckets < 1:
        raise ValueError(f"expected n_buckets >= 1 but got {n_buckets}")
    if n <= n_buckets:
        return np.arange(n, dtype=np.int64)
    # Integer edges of an even split: bucket sizes differ by at most one.
    return (np.arange(n_buckets, dtype=np.int64) * n) // n_buckets


def _bucket_ids(n: int, starts: np.ndarray) -> np.ndarray:
    """``(n,)`` bucket index of every position."""
    marks = np.zeros(n, dtype=np.int64)
    marks[starts[1:]] = 1
    return np.cumsum(marks)


def envelope(steps: np.ndarray, values: np.ndarray, max_points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """A line that visits the minimum and the maximum of every bucket, in step order.

    Returns ``(x, y)`` with at most ``max_points`` points. Short series come back unchanged apart
    from non-finite values, which become NaN (a gap in the line; mark them with
    :func:`nonfinite_marks`). A bucket holding no finite value contributes one NaN point so that
    the line breaks there instead of bridging the hole.
    """
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    finite = np.isfinite(values)
    if n <= max_points:
        return steps.copy(), np.where(finite, values, np.nan)
    starts = bucket_starts(n, max(1, max_points // 2))
    ids = _bucket_ids(n, starts)
    lo_src = np.where(finite, values, np.inf)
    hi_src = np.where(finite, values, -np.inf)
    lo = np.minimum.reduceat(lo_src, starts)
    hi = np.maximum.reduceat(hi_src, starts)
    # First position in each bucket where the bucket's min (max) is reached.
    at_lo = _first_per_bucket(np.flatnonzero(finite & (lo_src == lo[ids])), ids, len(starts))
    at_hi = _first_per_bucket(np.flatnonzero(finite & (hi_src == hi[ids])), ids, len(starts))
    empty = ~np.isfinite(lo)
    at_lo[empty] = starts[empty]
    at_hi[empty] = starts[empty]
    picked = np.unique(np.concatenate([at_lo, at_hi]))
    y = np.where(finite[picked], values[picked], np.nan)
    return steps[picked], y


def _first_per_bucket(positions: np.ndarray, ids: np.ndarray, n_buckets: int) -> np.ndarray:
    out = np.full(n_buckets, -1, dtype=np.int64)
    if len(positions):
        buckets, first = np.unique(ids[positions], return_index=True)
        out[buckets] = positions[first]
    return out


@dataclass(frozen=True)
class NonFiniteMarks:
    """Where a series held NaN/Inf, at most one mark per bucket.

    Attributes:
        steps: ``(k,)`` the first non-finite step of each marked bucket (where to draw the mark).
        last_steps: ``(k,)`` the last non-finite step of the same bucket.
        counts: ``(k,)`` how many non-finite steps the bucket holds.
        n_nan, n_inf: ``(k,)`` how many of those are NaN and ±Inf.
        total: non-finite steps in the whole series.
        first_step: the first non-finite step of the series (``None`` when all values are finite).
    """

    steps: np.ndarray
    last_steps: np.ndarray
    counts: np.ndarray
    n_nan: np.ndarray
    n_inf: np.ndarray
    total: int
    first_step: int | None

    def __len__(self) -> int:
        return len(self.steps)


def nonfinite_marks(steps: np.ndarray, values: np.ndarray, max_marks: int = 2000) -> NonFiniteMarks:
    """Group the non-finite steps of a series into at most ``max_marks`` marks."""
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if not len(bad):
        empty = np.zeros(0, dtype=np.int64)
        return NonFiniteMarks(empty, empty, empty, empty, empty, 0, None)
    starts = bucket_starts(len(values), max_marks)
    ids = _bucket_ids(len(values), starts)[bad]
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    last = first + counts - 1
    is_nan = np.isnan(values[bad]).astype(np.int64)
    n_nan = np.add.reduceat(is_nan, first)
    return NonFiniteMarks(
        steps=steps[bad[first]],
        last_steps=steps[bad[last]],
        counts=counts.astype(np.int64),
        n_nan=n_nan,
        n_inf=counts - n_nan,
        total=len(bad),
        first_step=int(steps[bad[0]]),
    )


@dataclass(frozen=True)
class BucketedMatrix:
    """A ``steps × columns`` matrix reduced to ``buckets × columns`` for a heatmap.

    Attributes:
        first_steps, last_steps: ``(b,)`` the step range each bucket covers.
        lo, hi: ``(b, c)`` the minimum and maximum finite value per bucket and column (NaN when
            the bucket holds none).
        nonfinite: ``(b, c)`` how many NaN/Inf values each bucket and column holds.
        present: ``(b, c)`` how many values were recorded at all (finite or not) — zero means a
            gap, as opposed to a non-finite value.
    """

    first_steps: np.ndarray
    last_steps: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    nonfinite: np.ndarray
    present: np.ndarray

    @property
    def centers(self) -> np.ndarray:
        """``(b,)`` the middle step of each bucket, where a heatmap centres its cell."""
        centers: np.ndarray = (self.first_steps + self.last_steps) / 2.0
        return centers


def bucket_matrix(steps: np.ndarray, matrix: np.ndarray, max_buckets: int = 600, *, missing: np.ndarray | None = None) -> BucketedMatrix:
    """Reduce the rows (steps) of ``matrix`` to at most ``max_buckets`` min/max buckets per column.

    ``missing`` (same shape, bool) flags entries that were not recorded (as opposed to recorded
    as NaN); by default every entry counts as recorded, so a NaN is a non-finite event.
    ``matrix`` may be float32 (a run's stored values): columns are taken a few at a time, so the
    float64 temporaries stay small for a 100,000-step run.
    """
    steps = np.asarray(steps)
    matrix = np.asarray(matrix)
    n, c = matrix.shape
    if n == 0:
        empty = np.zeros((0, c))
        none = np.zeros(0, dtype=np.int64)
        return BucketedMatrix(none, none, empty, empty, empty.astype(np.int64), empty.astype(np.int64))
    starts = bucket_starts(n, max_buckets)
    ends = np.append(starts[1:], n) - 1
    parts = []
    width = max(1, _BLOCK_VALUES // n)
    for first in range(0, max(c, 1), width):
        block = np.asarray(matrix[:, first : first + width], dtype=np.float64)
        finite = np.isfinite(block)
        recorded = ~missing[:, first : first + width] if missing is not None else np.ones_like(finite)
        lo = np.minimum.reduceat(np.where(finite, block, np.inf), starts, axis=0)
        hi = np.maximum.reduceat(np.where(finite, block, -np.inf), starts, axis=0)
        lo[~np.isfinite(lo)] = np.nan
        hi[~np.isfinite(hi)] = np.nan
        nonfinite = np.add.reduceat((~finite & recorded).astype(np.int64), starts, axis=0)
        present = np.add.reduceat(recorded.astype(np.int64), starts, axis=0)
        parts.append((lo, hi, nonfinite, present))
    lo, hi, nonfinite, present = (np.concatenate(arrays, axis=1) for arrays in zip(*parts, strict=True))
    return BucketedMatrix(steps[starts], steps[ends], lo, hi, nonfinite, present)


_BLOCK_VALUES = 1 << 20  # values per column block of bucket_matrix: 8 MB of float64 temporaries
