"""``oscillating_loss``: the loss swings up and down periodically instead of settling."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gradscope.detect import advice as A
from gradscope.detect import functional as F
from gradscope.detect.base import Detector
from gradscope.detect.rules._common import LossView, loss_view, step_at
from gradscope.findings import Finding, Fix, FixKind, Severity
from gradscope.store.run import Run

__all__ = ["OscillatingLoss"]


class OscillatingLoss(Detector):
    """The loss swings up and down instead of settling: with a regular period, or erratically while it loses its progress.

    **Symptom.** Around its trend, the loss rises and falls every few steps by tens of percent or
    more, over and over, instead of the irregular jitter of minibatch noise.

    **Why it matters.** The optimizer is bouncing across a valley instead of descending it — a step
    size (learning rate × 1/(1-momentum)) too large for the curvature. Progress is slow or nil, and
    the swings can grow into divergence.

    **Rule.** Over the last half of the run (``min_steps``-2000 steps), the loss in log10 space minus its
    centred rolling median (a third of the window) is the *detrended* loss. It oscillates when its
    autocorrelation dips to ≤ -``min_anticorrelation`` (at least 3/√n, the noise level of n points) at
    some lag and comes back to ≥ ``min_rebound`` within the next lags (a period, not noise); when its
    half-range (10th-90th percentile) is ≥ ``min_amplitude_decades`` (``min_amplitude_linear`` robust
    spreads for losses that can be ≤ 0); and when the swings of the last
    third are at least ``persist_ratio`` of those of the first third (not settling). ``warning`` when
    the loss is not improving, the outcome suffers, or the swings are larger than the descent over a
    window (the trend is lost in them); ``info`` while the loss descends faster than it swings.
    Heavy momentum also makes the loss swing *erratically*: a batch-to-batch spread of
    ≥ ``min_swing_decades`` decades that is not dying out, while the loss has lost ≥ 50% of the progress
    it had made (in log space) and is not improving — a ``warning``.

    **Fixes.** Lower the learning rate (a value is proposed) or, with SGD momentum ≥ 0.95, the momentum;
    then gradient clipping.

    A loss that saws with the class runs of unshuffled data is reported by ``unshuffled_data`` instead.
    """

    code = "oscillating_loss"

    @dataclass(frozen=True)
    class Config:
        min_anticorrelation: float = 0.4  # healthy detrended losses (small batches, schedules, LSTMs) dip to -0.1…-0.28 (noise); a momentum oscillation to -0.69
        min_rebound: float = 0.2  # after the dip the autocorrelation comes back up (the next crest of a period): 0.78 measured; white noise stays near 0
        min_amplitude_decades: float = 0.1  # swings of ≥ 0.1 decades (±26%) around the trend; smaller ones do not change the outcome
        min_amplitude_linear: float = 0.5  # for losses that can be ≤ 0: half a robust spread
        persist_ratio: float = 0.5  # swings of the last third at least half those of the first third: persistent, not settling
        min_swing_decades: float = A.ERRATIC_SWING_DECADES  # erratic: batch-to-batch spread ≥ 0.2 decades (±60%) while losing ≥ 50% of the progress (healthy noisy runs keep theirs)
        min_steps: int = 60  # 60 finite losses: a few periods of a typical 5-20 step oscillation

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        lv = loss_view(run)
        y = lv.values[lv.finite_rows]
        n = y.size
        if n < cfg.min_steps:
            return
        w = F.window_length(n, 0.5, cfg.min_steps, 2000)
        seg = y[n - w :]
        span = max(5, min(w // 3, 201)) | 1
        trend = F.rolling_median(seg, span, center=True)
        detrended = seg - trend
        acf = F.autocorrelation(detrended, w // 3)
        if acf.size < 4:
            return
        lag = int(np.argmin(acf[1:])) + 1
        dip = float(-acf[lag])
        threshold = max(cfg.min_anticorrelation, 3 / math.sqrt(w))
        rebound = float(acf[lag + 1 : min(acf.size, 3 * lag + 2)].max()) if lag + 1 < acf.size else -1.0
        amplitude = float((np.percentile(detrended, 90) - np.percentile(detrended, 10)) / 2)
        min_amp = cfg.min_amplitude_decades if lv.is_log else cfg.min_amplitude_linear
        third = max(2, w // 3)
        first_amp = float(np.percentile(detrended[:third], 90) - np.percentile(detrended[:third], 10))
        last_amp = float(np.percentile(detrended[-third:], 90) - np.percentile(detrended[-third:], 10))
        persist = last_amp / first_amp if first_amp > 0 else math.inf
        periodic = dip >= threshold and rebound >= cfg.min_rebound and amplitude >= min_amp and persist >= cfg.persist_ratio
        if not periodic:
            erratic = self._erratic(lv, y, w)
            if erratic is not None:
                yield self._erratic_finding(run, lv, *erratic)
            return
        f = A.facts(run)
        # The swings matter when they dominate the trend: the loss moves more up and down in a period
        # than it descends in a whole window.
        descent = -lv.progress.recent_change if np.isfinite(lv.progress.recent_change) else 0.0
        dominated = amplitude >= descent
        severity = Severity.WARNING if (lv.suffers or not lv.improving or dominated) else Severity.INFO
        row0 = int(lv.finite_rows[n - w])
        step = step_at(run, row0)
        period = 2 * lag
        factor = 10**amplitude if lv.is_log else amplitude
        swing = f"×{F.format_number(factor)} up and down" if lv.is_log else f"±{F.format_number(amplitude)} spreads"
        trend_text = "not improving" if not lv.improving else "still improving slowly"
        message = (
            f"the loss oscillates with a period of ~{period} steps, swinging {swing} around its trend "
            f"({'growing' if persist > 1.2 else 'not settling'}; {trend_text})"
        )
        evidence = {
            "period_steps": float(period),
            "anticorrelation": dip,
            "rebound": rebound,
            "amplitude_decades" if lv.is_log else "amplitude_spreads": amplitude,
            "amplitude_growth": float(persist) if np.isfinite(persist) else float("inf"),
            "lr": f.lr_at(),
            "momentum": f.momentum,
        }
        yield Finding(
            code=self.code,
            severity=severity,
            step=step,
            last_step=step_at(run, int(lv.finite_rows[-1])),
            message=message,
            evidence=evidence,
            fixes=self._fixes(f, step),
        )

    def _erratic(self, lv: LossView, y: np.ndarray, w: int) -> tuple[float, float] | None:
        """(swing, growth) when the loss swings widely from batch to batch while losing its progress."""
        cfg = self.config
        if not lv.is_log or not lv.worse or lv.improving:
            return None
        swing = lv.recent_noise
        if not np.isfinite(swing) or swing < cfg.min_swing_decades:
            return None
        seg = y[y.size - w :]
        wobble = seg - F.rolling_median(seg, 9, center=True)
        third = max(3, w // 3)
        first = F.robust_center_scale(wobble[:third])[1]
        last = F.robust_center_scale(wobble[-third:])[1]
        growth = last / first if first > 0 else math.inf
        if growth < cfg.persist_ratio:
            return None  # the swings are dying out: it is settling
        return float(swing), float(growth)

    def _erratic_finding(self, run: Run, lv: LossView, swing: float, growth: float) -> Finding:
        f = A.facts(run)
        p = lv.progress
        row0 = lv.worsening_onset_row
        step = step_at(run, row0)
        factor = 10**swing
        message = (
            f"the loss swings up and down by ×{F.format_number(factor)} from batch to batch without settling, and has lost "
            f"{F.format_number(100 * p.regress)}% of its progress since step {step} (best {F.format_number(10**p.best, 3)}, "
            f"now {F.format_number(10**p.recent, 3)})"
        )
        evidence = {
            "swing_decades": swing,
            "swing_growth": growth if np.isfinite(growth) else float("inf"),
            "progress_lost_fraction": float(p.regress),
            "loss_best": float(10**p.best),
            "loss_recent": float(10**p.recent),
            "lr": f.lr_at(),
            "momentum": f.momentum,
        }
        return Finding(
            code=self.code,
            severity=Severity.WARNING,
            step=step,
            last_step=step_at(run, int(lv.finite_rows[-1])),
            message=message,
            evidence=evidence,
            fixes=self._fixes(f, step),
        )

    def _fixes(self, f: A.RunFacts, step: int | None) -> tuple[Fix, ...]:
        causes = A.likely_causes(f, step=step)
        first = A.lower_lr_fix(f, None, what="makes the loss oscillate")
        momentum = f.momentum
        extra = []
        if np.isfinite(momentum) and momentum >= 0.9 and not f.is_adaptive:
            extra.append(
                Fix(
                    FixKind.OPTIMIZER,
                    f"momentum={F.format_number(momentum, 3)} makes SGD overshoot and swing back: the effective step is "
                    f"lr/(1-momentum) = {F.format_number(f.lr_at() / max(1 - momentum, 1e-6))}; try momentum=0.9 or lower.",
                )
            )
        return A.ranked_fixes(
            [first],
            [c.fix for c in causes if c.fix.kind is not FixKind.LEARNING_RATE],
            extra,
            [A.clip_fix(f)],
        )

