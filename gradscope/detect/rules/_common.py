"""Helpers the built-in detectors share: step numbers of rows, the shared loss view, and the
robust trend of a curve's tail."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradscope.detect import functional as F
from gradscope.detect.advice import LossView, loss_view
from gradscope.store.run import Run

__all__ = ["LossView", "SustainedHits", "TailTrend", "loss_view", "step_at", "sustained_above", "tail_trend"]


def step_at(run: Run, index: int | None) -> int | None:
    """The optimizer step of a row of the run (rows and steps differ in windowed live runs)."""
    if index is None or not 0 <= index < run.n_steps:
        return None
    return int(run.steps[index])


@dataclass(frozen=True)
class SustainedHits:
    """Modules whose sampled fraction stays at or above a threshold, most affected first."""

    fractions: dict[str, float]  # module -> median fraction over the recent window
    ranked: list[str]
    step: int  # the step since which the first of them has stayed above the threshold


def sustained_above(
    frame: pd.DataFrame,
    modules: list[str],
    threshold: float,
    *,
    min_samples: int,
    window_fraction: float,
    sustained_share: float,
) -> SustainedHits | None:
    """Which ``modules`` of a sampled ``steps × modules`` frame (dead or saturated fractions) sit at or
    above ``threshold`` in the recent window — median and ``sustained_share`` of the samples — and
    since when. ``None`` when none does or there are fewer than ``min_samples`` samples."""
    n = len(frame)
    if frame.empty or not modules or n < min_samples:
        return None
    w = min(n, max(min_samples, F.window_length(n, window_fraction, min_samples, 1000)))
    recent = frame[modules].iloc[n - w :]
    fractions: dict[str, float] = {}
    for m in modules:
        values = recent[m].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size < min_samples:
            continue
        if np.median(values) >= threshold and (values >= threshold).mean() >= sustained_share:
            fractions[m] = float(np.median(values))
    if not fractions:
        return None
    ranked = sorted(fractions, key=lambda m: -fractions[m])
    onsets = []
    for m in ranked:
        mask = np.nan_to_num(frame[m].to_numpy(dtype=np.float64), nan=0.0) >= threshold
        start = F.last_sustained_start(mask)
        onsets.append(int(frame.index[start]) if start is not None else int(frame.index[n - w]))
    return SustainedHits(fractions, ranked, min(onsets))


# Under normal noise the Theil–Sen slope has 3/π (95.5%) of the least-squares slope's efficiency
# (Sen 1968): its standard error is the least-squares one × √(π/3).
_THEIL_SEN_SE_FACTOR = math.sqrt(math.pi / 3)
# Pairwise slopes of at most 500 points (125,000 pairs, ~3 ms); a longer tail (runs of > 2,500 steps,
# whose 500-step windows already make the error small) is thinned evenly, the error growing to match.
_TREND_MAX_POINTS = 500


@dataclass(frozen=True)
class TailTrend:
    """The robust straight-line trend of the last points of a curve."""

    change: float  # fitted change of level over one window (negative: falling); NaN under 3 points
    stderr: float  # standard error of ``change`` under the curve's own point-to-point noise
    points: int  # how many points the trend was fitted on


def tail_trend(values: np.ndarray, window: int, *, min_noise: float = 0.0) -> TailTrend:
    """The Theil–Sen trend of the last ``2·window`` finite ``values``, as the change it predicts over
    one ``window``, with its standard error.

    The slope is the median of the slopes between all pairs of points, so a few outlier batches
    cannot make it; the error is that of a least-squares slope (σ·√12/m^1.5 per point for m points)
    under the robust spread σ of the residuals, scaled to Theil–Sen's efficiency. σ is at least
    ``min_noise`` (the run's own batch-to-batch noise): the spread of a few dozen residuals can read
    low by chance, and a too-small error would turn noise into a trend.
    """
    y = np.asarray(values, dtype=np.float64)
    y = y[np.isfinite(y)][-2 * max(int(window), 1) :]
    m = int(y.size)
    if m < 3:
        return TailTrend(math.nan, math.nan, m)
    x = np.arange(m, dtype=np.float64)
    stride = math.ceil(m / _TREND_MAX_POINTS)
    xs, ys = x[::stride], y[::stride]
    i, j = np.triu_indices(xs.size, 1)
    slope = float(np.median((ys[j] - ys[i]) / (xs[j] - xs[i])))
    sigma = max(F.robust_center_scale(y - slope * x)[1], min_noise)
    spread = float(np.sqrt(((xs - xs.mean()) ** 2).sum()))
    stderr = _THEIL_SEN_SE_FACTOR * sigma / spread
    return TailTrend(change=slope * window, stderr=stderr * window, points=m)
