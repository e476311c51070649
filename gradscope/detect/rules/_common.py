"""Helpers the built-in detectors share: step numbers of rows, and the shared loss view."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradscope.detect import functional as F
from gradscope.detect.advice import LossView, loss_view
from gradscope.store.run import Run

__all__ = ["LossView", "SustainedHits", "loss_view", "step_at", "sustained_above"]


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
