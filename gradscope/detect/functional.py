"""Pure numpy math behind the detectors: robust statistics, windows, trends.

Every function takes plain arrays (NaN marks a missing value), never raises on empty, constant or
non-finite input, and returns NaN (or ``None`` for an index) when there is nothing to measure.
Detectors combine these; they are unit-tested here without a model.

Loss-like series are analysed in log10 space when they are positive (a "decade" is a factor of
10), so that thresholds mean the same for a classifier at 2.3 and a regression at 6e5 or 1e-9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = [
    "MAD_TO_SIGMA",
    "LossExcursion",
    "LossProgress",
    "as_array",
    "autocorrelation",
    "centered_jump",
    "column_medians",
    "decades",
    "depth_deficit",
    "first_sustained",
    "format_number",
    "last_sustained_start",
    "log10_positive",
    "loss_excursions",
    "loss_progress",
    "nan_median",
    "nan_percentile",
    "plateau_start",
    "robust_center_scale",
    "robust_zscore",
    "rolling_median",
    "runs_of_true",
    "slope",
    "trailing_jump",
    "transform_loss",
    "window_length",
]

# The median absolute deviation times 1.4826 estimates the standard deviation of normal data.
MAD_TO_SIGMA = 1.4826

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def as_array(values: npt.ArrayLike) -> FloatArray:
    """``values`` as a flat float64 array (an empty one for ``None`` or a scalar-less input)."""
    if values is None:
        return np.zeros(0, dtype=np.float64)
    arr = np.asarray(values, dtype=np.float64)
    return arr.reshape(-1)


def log10_positive(values: npt.ArrayLike) -> FloatArray:
    """log10 of positive finite values; NaN for zero, negative, NaN or infinite ones."""
    arr = as_array(values)
    out = np.full(arr.shape, np.nan)
    ok = np.isfinite(arr) & (arr > 0)
    out[ok] = np.log10(arr[ok])
    return out


def decades(numerator: float, denominator: float) -> float:
    """log10(numerator / denominator) for positive finite numbers, else NaN."""
    if not (np.isfinite(numerator) and np.isfinite(denominator)) or numerator <= 0 or denominator <= 0:
        return math.nan
    return float(math.log10(numerator) - math.log10(denominator))


def nan_median(values: npt.ArrayLike) -> float:
    """Median of the finite values, NaN when there are none."""
    arr = as_array(values)
    arr = arr[np.isfinite(arr)]
    return float(np.median(arr)) if arr.size else math.nan


def nan_percentile(values: npt.ArrayLike, q: float) -> float:
    """The ``q``-th percentile (0-100) of the finite values, NaN when there are none."""
    arr = as_array(values)
    arr = arr[np.isfinite(arr)]
    return float(np.percentile(arr, q)) if arr.size else math.nan


def robust_center_scale(values: npt.ArrayLike, *, min_scale: float = 0.0) -> tuple[float, float]:
    """``(median, 1.4826·MAD)`` of the finite values: a location and spread that outliers cannot move.

    The spread is at least ``min_scale`` (so a constant series does not give infinite z-scores).
    """
    arr = as_array(values)
    arr = arr[np.isfinite(arr)]
    if not arr.size:
        return math.nan, math.nan
    center = float(np.median(arr))
    scale = float(np.median(np.abs(arr - center))) * MAD_TO_SIGMA
    return center, max(scale, min_scale)


def robust_zscore(values: npt.ArrayLike, *, min_scale: float = 1e-12) -> FloatArray:
    """``(x - median) / (1.4826·MAD)`` per value; NaN where the value is not finite."""
    arr = as_array(values)
    center, scale = robust_center_scale(arr, min_scale=min_scale)
    with np.errstate(invalid="ignore"):
        z = (arr - center) / scale
    z[~np.isfinite(arr)] = np.nan
    return z


def window_length(n: int, fraction: float, lo: int, hi: int) -> int:
    """A window of ``fraction`` of ``n`` points, clipped to ``[lo, hi]`` and to ``n`` (at least 1)."""
    size = round(n * fraction) if n > 0 else lo
    return max(1, min(max(size, lo), hi, max(n, 1)))


def rolling_median(values: npt.ArrayLike, window: int, *, min_periods: int = 1, center: bool = False) -> FloatArray:
    """Trailing (or centred) rolling median that skips NaN; NaN where fewer than ``min_periods`` values."""
    arr = as_array(values)
    if not arr.size:
        return arr
    arr = np.where(np.isfinite(arr), arr, np.nan)
    window = max(1, int(window))
    series = pd.Series(arr).rolling(window, min_periods=max(1, min(min_periods, window)), center=center)
    return np.asarray(series.median().to_numpy(), dtype=np.float64)


def trailing_jump(values: npt.ArrayLike, window: int, *, min_periods: int = 3) -> FloatArray:
    """How far each value sits above the median of the ``window`` values before it (NaN-skipping).

    For a log-scale series this is the jump in decades over the recent level.
    """
    arr = as_array(values)
    if not arr.size:
        return arr
    clean = np.where(np.isfinite(arr), arr, np.nan)
    before = pd.Series(clean).shift(1).rolling(max(1, window), min_periods=max(1, min_periods)).median()
    return np.asarray(clean - before.to_numpy(), dtype=np.float64)


def centered_jump(values: npt.ArrayLike, half_window: int, *, min_periods: int = 3) -> FloatArray:
    """How far each value sits above the median of its neighbours (``half_window`` on each side, itself excluded).

    Unlike :func:`trailing_jump` it judges the first values of a series too (against the ones after
    them), so a spike at step 0 is seen; at the end of the series it falls back to the values before.
    """
    arr = as_array(values)
    n = arr.size
    if not n:
        return arr
    clean = np.where(np.isfinite(arr), arr, np.nan)
    h = max(1, int(half_window))
    series = pd.Series(clean)
    before = series.shift(1).rolling(h, min_periods=1).median().to_numpy(dtype=np.float64)
    after = series[::-1].shift(1).rolling(h, min_periods=1).median().to_numpy(dtype=np.float64)[::-1]
    count_before = series.shift(1).rolling(h, min_periods=1).count().to_numpy(dtype=np.float64)
    count_after = series[::-1].shift(1).rolling(h, min_periods=1).count().to_numpy(dtype=np.float64)[::-1]
    count_before = np.nan_to_num(count_before)
    count_after = np.nan_to_num(count_after)
    total = count_before + count_after
    # The neighbourhood level: a count-weighted mix of the medians before and after (exact median of
    # the union would need a window sort per point; the mix is as robust for a single spike).
    with np.errstate(invalid="ignore", divide="ignore"):
        level = (np.nan_to_num(before) * count_before + np.nan_to_num(after) * count_after) / total
    level[total < min_periods] = np.nan
    return np.asarray(clean - level, dtype=np.float64)


def runs_of_true(mask: npt.ArrayLike) -> list[tuple[int, int]]:
    """``[(start, length), …]`` of the consecutive runs of True in ``mask``."""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    if not m.size:
        return []
    padded = np.concatenate([[False], m, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[::2], edges[1::2]
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def first_sustained(mask: npt.ArrayLike, min_length: int) -> int | None:
    """Index where ``mask`` first holds for at least ``min_length`` consecutive points (or to the end)."""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    for start, length in runs_of_true(m):
        if length >= min_length or start + length == m.size:
            return start
    return None


def last_sustained_start(mask: npt.ArrayLike) -> int | None:
    """Start of the run of True that reaches the end of ``mask`` (None when the last point is False)."""
    runs = runs_of_true(mask)
    m = np.asarray(mask, dtype=bool).reshape(-1)
    if runs and runs[-1][0] + runs[-1][1] == m.size:
        return runs[-1][0]
    return None


def autocorrelation(values: npt.ArrayLike, max_lag: int) -> FloatArray:
    """Autocorrelation of the finite ``values`` at lags 0..max_lag (via FFT); empty under 4 values or
    for a constant series."""
    x = as_array(values)
    x = x[np.isfinite(x)]
    if x.size < 4:
        return np.zeros(0)
    x = x - x.mean()
    spectrum = np.fft.rfft(x, 2 * x.size)
    acov = np.fft.irfft(spectrum * np.conj(spectrum))[: max(1, min(max_lag, x.size - 1)) + 1]
    if acov[0] <= 0:
        return np.zeros(0)
    return np.asarray(acov / acov[0], dtype=np.float64)


def slope(values: npt.ArrayLike, x: npt.ArrayLike | None = None) -> float:
    """Least-squares slope of the finite values against ``x`` (default: their index); NaN under 2 points."""
    y = as_array(values)
    xs = as_array(x) if x is not None else np.arange(y.size, dtype=np.float64)
    ok = np.isfinite(y) & np.isfinite(xs)
    if ok.sum() < 2:
        return math.nan
    xs, y = xs[ok], y[ok]
    xc = xs - xs.mean()
    denom = float((xc * xc).sum())
    if denom == 0:
        return math.nan
    return float((xc * (y - y.mean())).sum() / denom)


def plateau_start(smoothed: npt.ArrayLike, level: float, band: float) -> int | None:
    """First index after which the smoothed series never again leaves ``level ± band`` from above.

    That is the step from which a loss stopped improving: every later value stays within ``band`` of
    the final level (or below it).
    """
    arr = as_array(smoothed)
    if not arr.size or not np.isfinite(level):
        return None
    above = np.isfinite(arr) & (arr > level + band)
    idx = np.flatnonzero(above)
    if not idx.size:
        return 0
    start = int(idx[-1]) + 1
    return start if start < arr.size else None


def format_number(value: float, digits: int = 2) -> str:
    """A short human number with ``digits`` significant digits: 0.0012 → "0.0012", 8.0 → "8",
    120.4 → "120", 3.2e-05 → "3.2e-05", 4.1e+07 → "4.1e+07"."""
    value = float(value)
    if not np.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if -4 <= magnitude < 6:
        places = digits - 1 - magnitude
        decimals = max(0, places)
        text = f"{round(value, places):.{decimals}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text
    mantissa, exponent = f"{value:.{max(digits - 1, 0)}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent):+03d}"


# --------------------------------------------------------------------------- the loss curve


def transform_loss(loss: npt.ArrayLike) -> tuple[FloatArray, bool]:
    """The loss in the space its thresholds are read in: ``(values, is_log)``.

    Non-negative losses go to log10 (a decade is a factor of 10; exact zeros are left out, as NaN).
    A loss that takes negative values
    (a log-likelihood, a reward) stays linear, divided by its robust spread so that one unit is a
    typical swing; non-finite values become NaN either way.
    """
    arr = as_array(loss)
    finite = arr[np.isfinite(arr)]
    if not finite.size:
        return np.full(arr.shape, np.nan), True
    if (finite >= 0).all() and (finite > 0).any():
        # A loss of exactly 0 (every example of a batch classified with a margin past float32's
        # range) has no level in log space: it is left out, as a step with no loss is. Standing it
        # at some positive value instead would invent a level: at the smallest one seen, a diverged
        # run whose loss swings between 0 and 10^3 read as noise of ~0.75 decades around its start.
        return log10_positive(arr), True
    center, scale = robust_center_scale(finite)
    spread = max(scale, float(np.ptp(finite)) / 10, 1e-12)
    out = np.where(np.isfinite(arr), (arr - center) / spread, np.nan)
    return out.astype(np.float64), False


@dataclass(frozen=True)
class LossProgress:
    """Where a loss curve stands, in transformed units (decades for positive losses).

    Attributes:
        n: finite loss values.
        is_log: True when values are log10 of the loss.
        start: level at the start: the first value, or the median of the first 3 if lower.
        best: lowest level of the smoothed curve, and ``best_index`` where it was reached.
        recent: level over the last window.
        gain: ``start - recent`` (decades gained; positive is better).
        regress: fraction of the progress made up to the best point that has been lost since
            (0 = at its best, 1 = back at the start, > 1 = worse than the start; NaN when no progress).
        recent_change: change of the level over the last window (negative = still improving).
        noise: robust spread of the values around the smoothed curve.
        window: the window length (in points) behind ``start``/``recent``.
    """

    n: int
    is_log: bool
    start: float
    best: float
    best_index: int
    recent: float
    gain: float
    regress: float
    recent_change: float
    noise: float
    window: int


def loss_progress(loss: npt.ArrayLike, *, window: int | None = None) -> LossProgress:
    """Summarise a loss curve robustly (see :class:`LossProgress`); never raises.

    ``window`` defaults to 10% of the finite points, between 5 and 500: long enough to average out
    small-batch noise, short enough to see the current state of a long run.
    """
    values, is_log = transform_loss(loss)
    finite_idx = np.flatnonzero(np.isfinite(values))
    y = values[finite_idx]
    n = int(y.size)
    if n == 0:
        nan = math.nan
        return LossProgress(0, is_log, nan, nan, -1, nan, nan, nan, nan, nan, 0)
    w = window if window is not None else window_length(n, 0.1, 5, 500)
    w = max(1, min(w, n))
    smooth = rolling_median(y, w, min_periods=1)
    # The untrained level: the first value, or the median of the first three if lower (a loss that
    # blew up in its first steps must not raise its own starting level; one noisy first batch cannot
    # lower it much, as untrained predictions vary little from batch to batch).
    start = float(min(y[0], np.median(y[: min(3, n)])))
    recent = float(np.median(y[-w:]))
    # The best level is read on the smoothed curve from a full window on, so one lucky batch
    # cannot set it.
    settled = smooth[w - 1 :] if n >= w else smooth
    offset = w - 1 if n >= w else 0
    best_pos = int(np.nanargmin(settled)) + offset
    best = float(min(smooth[best_pos], start))
    progress = start - best
    regress = (recent - best) / progress if progress > 1e-9 else math.nan
    half = max(1, w // 2)
    if n >= 2 * w:
        recent_change = float(np.median(y[-w:]) - np.median(y[-2 * w : -w]))
    elif n >= 2 * half:
        recent_change = float(np.median(y[-half:]) - np.median(y[-2 * half : -half]))
    else:
        recent_change = math.nan
    noise = robust_center_scale(y - smooth)[1]
    return LossProgress(
        n=n,
        is_log=is_log,
        start=start,
        best=best,
        best_index=int(finite_idx[best_pos]),
        recent=recent,
        gain=start - recent,
        regress=float(regress),
        recent_change=recent_change,
        noise=float(noise) if np.isfinite(noise) else math.nan,
        window=w,
    )


def column_medians(frame: pd.DataFrame, rows: slice | None = None) -> dict[str, float]:
    """Median of each column over the given rows (NaN-skipping): a per-layer profile."""
    sub = frame if rows is None else frame.iloc[rows]
    return {str(c): nan_median(sub[c].to_numpy(dtype=np.float64)) for c in sub.columns}


def depth_deficit(profile: npt.ArrayLike) -> FloatArray:
    """For values ordered by depth (input side first), how far each sits below the largest value after it.

    With per-layer log10 gradient norms this is, per layer, how many decades of gradient were lost
    between that layer and the best-fed layer closer to the output (0 for the last layer; NaN where
    the layer has no value or nothing after it has one).
    """
    p = as_array(profile)
    if not p.size:
        return p
    clean = np.where(np.isfinite(p), p, -np.inf)
    suffix_max = np.maximum.accumulate(clean[::-1])[::-1]
    after = np.concatenate([suffix_max[1:], [-np.inf]])
    with np.errstate(invalid="ignore"):
        out = after - p
    out[~np.isfinite(p) | ~np.isfinite(after)] = np.nan
    return out


@dataclass(frozen=True)
class LossExcursion:
    """One stretch where the loss stood far above its healthy level (indices into the finite loss values)."""

    onset: int  # first point of the rise
    start: int  # first point confirmed above the threshold
    end: int  # last point above it
    reference: float  # the healthy level before it (transformed units)
    peak: float  # the highest point reached (transformed units)


def loss_excursions(
    values: np.ndarray, *, window: int, threshold: float, min_points: int, initial_points: int = 3
) -> list[LossExcursion]:
    """Stretches of ≥ ``min_points`` consecutive values more than ``threshold`` above the healthy level.

    The healthy level before each point is the lower of the first values' median and the running
    minimum of the ``window``-point rolling median, so neither a lucky batch nor the explosion itself
    can move it. ``values`` are finite transformed losses (log10 for positive losses).
    """
    y = np.asarray(values, dtype=np.float64)
    n = y.size
    if n < 2:
        return []
    # The untrained level: the first value, or the first few values' median if lower (so a blow-up
    # that starts at step 1 is measured from step 0).
    anchor = float(min(y[0], np.median(y[: max(1, min(initial_points, n))])))
    long = rolling_median(y, window, min_periods=max(1, min(window // 2, n)))
    long = np.where(np.isfinite(long), long, np.inf)
    best = np.minimum(np.minimum.accumulate(long), anchor)
    # The level before each point (excluding the point itself).
    reference = np.concatenate([[anchor], best[:-1]])
    above = (y - reference) >= threshold
    out: list[LossExcursion] = []
    for start, length in runs_of_true(above):
        if length < min_points and start + length != n:
            continue
        ref = float(reference[start])
        onset = start
        # Walk back to where the rise began: points already a third of the way up.
        while onset > 0 and y[onset - 1] - ref >= threshold / 3:
            onset -= 1
        end = start + length - 1
        out.append(LossExcursion(onset, start, end, ref, float(y[start : end + 1].max())))
    return out
