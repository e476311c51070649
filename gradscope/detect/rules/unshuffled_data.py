"""``unshuffled_data``: the loss saws up and down with the class runs of data that was never shuffled."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from gradscope.detect import advice as A
from gradscope.detect import functional as F
from gradscope.detect.base import Detector
from gradscope.detect.rules._common import loss_view, step_at
from gradscope.findings import Finding, Severity
from gradscope.store.run import Run

__all__ = ["Sawtooth", "UnshuffledData", "rank_autocorrelation", "sawtooth"]

# The first autocorrelation crest at least this share of the highest one is the period: a period P
# repeats its crest at 2P, 3P, … and a whole epoch of class runs repeats it again at a long lag,
# often higher than at P (measured 0.53-0.56 at one class run against 0.88 at the epoch).
_FUNDAMENTAL_SHARE = 0.5
# A learning rate that rose this much in one step restarted its schedule (CosineAnnealingWarmRestarts,
# a cyclic schedule): its restarts make the same sawtooth, so the run is left alone when they coincide
# with at least half of the loss jumps.
_LR_RESTART_FACTOR = 1.5


class UnshuffledData(Detector):
    """The training data is not shuffled and comes in long runs of one class: the loss saws up and down.

    **Symptom.** The loss jumps up sharply at regular intervals and falls steeply in between, over and
    over, epoch after epoch: a sawtooth. Each tooth is a run of batches of a single class (a
    ``DataLoader(..., shuffle=False)`` over a dataset stored class by class): the model learns to
    predict that class, the loss falls, and it jumps when the next class begins.

    **Why it matters.** The model chases the class of the moment instead of learning all of them, and
    forgets each as the next comes. It ends up predicting mostly the last classes it saw and fails on a
    balanced test set, though the training loss within each run looked low.

    **Rule.** Over the last ``min_steps``-2000 losses (log10 space; only positive losses), the loss minus its
    centred rolling median (a third of the window) is ranked, so that a few losses near zero cannot
    dominate, and its autocorrelation must show a crest of ≥ ``min_periodicity`` (and ≥ 4/√n, four
    standard errors of noise over n points) at a period of ≥ ``min_period`` steps, at most a sixth of the window: a
    repeating pattern. The period is the shortest lag whose crest reaches both that and half the
    highest crest (a period repeats at its multiples; the epoch repeats all the class runs). The
    pattern must be a sawtooth, not a swing: taking in each period its largest one-step rise and its
    largest one-step fall, the rises must carry a larger share of all the rising than the falls carry
    of all the falling, by ≥ ``min_asymmetry`` (the loss jumps up in one step and comes down over
    several). Minibatch noise, oscillations, spikes and square waves are symmetric in time and
    measured ≤ 0.21; class-sorted runs 0.30-0.82. The median jump must be ≥ ``min_jump_decades``.
    Loss jumps that coincide with learning-rate restarts (warm restarts, cyclic schedules) are left
    alone. ``warning``.

    **Fixes.** Shuffle the training data: ``DataLoader(..., shuffle=True)``, or a random sampler
    (``DistributedSampler(shuffle=True)`` with ``set_epoch`` each epoch); check the dataset is not
    stored sorted by label.

    Its finding replaces an ``oscillating_loss`` one on the same run: the same swings, whose fix is
    not a lower learning rate.
    """

    code = "unshuffled_data"
    supersedes = ("oscillating_loss",)  # its swings are the class runs: a lower lr would not help

    @dataclass(frozen=True)
    class Config:
        min_periodicity: float = 0.35  # 146 healthy runs (16 benchmark scenarios × 6 seeds, shuffled twins of the sorted runs, synthetic curves) measured ≤ 0.24 over ≥ 141 steps, 0.34 over 96 (under that run's 4/√n = 0.41); class-sorted runs 0.35-0.88 where detected
        min_asymmetry: float = 0.25  # healthy runs measured ≤ 0.21; oscillations, periodic spikes and square waves within ±0.11 (symmetric in time); class-sorted runs 0.30-0.82
        min_jump_decades: float = 0.05  # jumps of ≥ 12%: class-sorted runs measured 0.06-2.5 decades, every one failing a balanced test set (10-39% accuracy, 80-97% shuffled)
        min_period: int = 4  # class runs of ≥ 4 batches; with 2.3 batches a class the loss shows no sawtooth (asymmetry 0.11)
        min_steps: int = 60  # 60 finite losses: crests up to lag 10 (a sixth of them), each repeated ≥ 6 times

    def check(self, run: Run) -> Iterator[Finding]:
        found = self.class_runs(run)
        if found is None:
            return
        tooth, rows = found
        w = rows.size
        first, last = int(rows[0]), int(rows[-1])
        message = (
            f"the loss jumps ×{F.format_number(10**tooth.jump_decades)} every ~{tooth.period} steps and falls "
            f"×{F.format_number(10**tooth.fall_decades)} in between ({tooth.jumps.size} jumps in {w} steps): the batches "
            "look like runs of a single class, as when the training data is sorted by label and not shuffled"
        )
        evidence = {
            "period_steps": float(tooth.period),
            "periodicity": tooth.periodicity,
            "asymmetry": tooth.asymmetry,
            "jump_decades": tooth.jump_decades,
            "fall_decades": tooth.fall_decades,
            "jumps": float(tooth.jumps.size),
            "window": float(w),
        }
        yield Finding(
            code=self.code,
            severity=Severity.WARNING,
            step=step_at(run, first),
            last_step=step_at(run, last),
            message=message,
            evidence=evidence,
            fixes=A.shuffle_fixes(tooth.period),
        )


    def class_runs(self, run: Run) -> tuple[Sawtooth, npt.NDArray[np.int64]] | None:
        """The sawtooth of class runs in the run's loss, with the rows of the window it was measured
        on, or None."""
        cfg = self.config
        lv = loss_view(run)
        if not lv.is_log:
            return None  # class-sorted data is a classification problem: its losses are positive
        y = lv.values[lv.finite_rows]
        n = y.size
        if n < cfg.min_steps:
            return None
        w = F.window_length(n, 1.0, cfg.min_steps, 2000)
        threshold = max(cfg.min_periodicity, 4 / np.sqrt(w))
        tooth = sawtooth(y[n - w :], min_period=cfg.min_period, min_periodicity=threshold)
        if tooth is None or tooth.asymmetry < cfg.min_asymmetry or tooth.jump_decades < cfg.min_jump_decades:
            return None
        rows = np.asarray(lv.finite_rows[n - w :], dtype=np.int64)
        if _restarts_share(A.facts(run).lr_series, rows[tooth.jumps]) >= 0.5:
            return None
        return tooth, rows


@dataclass(frozen=True)
class Sawtooth:
    """A periodic loss pattern and its shape, measured on a window of log10 losses."""

    period: int  # steps
    periodicity: float  # rank autocorrelation at the period
    asymmetry: float  # share of the rising made by each period's largest rise, minus that of the falling by its largest fall
    jump_decades: float  # median largest one-step rise per period
    fall_decades: float  # median fall from each jump to the lowest point before the next period
    jumps: npt.NDArray[np.int64]  # indices into the window of the points the loss jumped to


def rank_autocorrelation(values: npt.ArrayLike, max_lag: int) -> F.FloatArray:
    """Autocorrelation of the ranks of the finite ``values`` at lags 0..max_lag (empty for a constant series).

    Ranks keep the shape of a pattern but not the size of its outliers: a loss of 1e-7 on one batch is
    not 4 decades of pattern."""
    x = F.as_array(values)
    x = x[np.isfinite(x)]
    return F.autocorrelation(pd.Series(x).rank(method="average").to_numpy(dtype=np.float64), max_lag)


def sawtooth(values: npt.ArrayLike, *, min_period: int, min_periodicity: float) -> Sawtooth | None:
    """The periodic pattern of a window of log10 losses (finite, in order), or ``None`` when it has none
    with a crest of ≥ ``min_periodicity`` at a lag of ``min_period`` to a sixth of the window."""
    seg = F.as_array(values)
    w = seg.size
    span = max(9, w // 3) | 1
    detrended = seg - F.rolling_median(seg, span, center=True)
    acf = rank_autocorrelation(detrended, w // 6)
    negative = np.flatnonzero(acf < 0)
    if not negative.size:
        return None
    # Crests after the first dip below zero: before it the series only resembles its own neighbours.
    lags = np.arange(max(min_period, int(negative[0])), acf.size - 1)
    crests = lags[(acf[lags] >= acf[lags - 1]) & (acf[lags] >= acf[lags + 1])]
    highest_crest = float(acf[crests].max()) if crests.size else -1.0
    if not crests.size or highest_crest < min_periodicity:
        return None
    floor = min(highest_crest, max(min_periodicity, _FUNDAMENTAL_SHARE * highest_crest))
    period = int(crests[acf[crests] >= floor][0])
    d = np.diff(seg)
    half = max(1, period // 2)
    # One jump per period: the rises that are the largest within half a period on either side (and
    # the falls that are the deepest).
    windows = np.lib.stride_tricks.sliding_window_view
    highest = windows(np.r_[np.full(half, -np.inf), d, np.full(half, -np.inf)], 2 * half + 1).max(axis=1)
    lowest = windows(np.r_[np.full(half, np.inf), d, np.full(half, np.inf)], 2 * half + 1).min(axis=1)
    is_jump = (d > 0) & (d >= highest)
    is_drop = (d < 0) & (d <= lowest)
    rising, falling = float(d[d > 0].sum()), float(-d[d < 0].sum())
    if not is_jump.any() or rising <= 0 or falling <= 0:
        return None
    asymmetry = float(d[is_jump].sum()) / rising - float(-d[is_drop].sum()) / falling
    jumps = np.flatnonzero(is_jump) + 1
    falls = [seg[t] - seg[t : min(w, t + period)].min() for t in jumps]
    return Sawtooth(
        period=period,
        periodicity=float(acf[period]),
        asymmetry=asymmetry,
        jump_decades=float(np.median(d[is_jump])),
        fall_decades=float(np.median(falls)),
        jumps=jumps.astype(np.int64),
    )


def _restarts_share(lr: npt.NDArray[np.float64], jump_rows: npt.NDArray[np.int64]) -> float:
    """The share of the loss jumps within a step of a learning-rate restart."""
    if lr.size < 2 or not jump_rows.size:
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        restarted = np.r_[False, lr[1:] >= _LR_RESTART_FACTOR * lr[:-1]]
    restarted &= np.isfinite(lr)
    near = restarted | np.r_[restarted[1:], False] | np.r_[False, restarted[:-1]]
    inside = jump_rows[jump_rows < lr.size]
    return float(near[inside].mean()) if inside.size else 0.0
