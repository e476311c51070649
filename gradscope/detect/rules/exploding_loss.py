"""``exploding_loss``: the loss diverges — it climbs orders of magnitude above its healthy level."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gradscope.detect import advice as A
from gradscope.detect import functional as F
from gradscope.detect.advice import LossView, loss_view
from gradscope.detect.base import Detector
from gradscope.detect.functional import LossExcursion, loss_excursions
from gradscope.detect.rules._common import step_at
from gradscope.findings import Finding, Severity
from gradscope.store.run import Run

__all__ = ["ExplodingLoss"]


class ExplodingLoss(Detector):
    """The loss diverged: it climbed orders of magnitude above its healthy level.

    **Symptom.** The loss shoots up — often to many times its starting value — and either stays there,
    settles at the level of an untrained model, or runs into NaN/Inf.

    **Why it matters.** A diverged run has thrown away what it learned; the steps after the blow-up
    are wasted until the cause is fixed.

    **Rule.** On the loss in log10 space (a decade is a factor of 10; losses that can be ≤ 0 are read
    in units of their robust spread), the healthy level before each step is the lower of the first
    loss (or the median of the first three) and the running minimum of a rolling median over 10% of the run. An *excursion* is
    ≥ ``min_steps`` consecutive steps more than ``threshold_decades`` decades above that level (the
    threshold rises to ``noise_sigmas`` × the curve's own noise for very noisy losses;
    ``threshold_linear`` robust spreads for losses that can be ≤ 0). ``error`` when the last excursion
    has not recovered: the loss is still up there, turned non-finite, is frozen (the same on every
    batch), or came back no lower than its start. It recovered when its recent level is back within
    ``recovered_fraction`` of the way from its pre-excursion level to its start and at least
    ``recovered_gain_decades`` below its start: then the excursion is ``info``. A loss that slowly climbed — lost ≥ 50% of its progress in log space, stands ≥ 2× above
    its best, without a sudden jump and without large batch-to-batch swings (those are
    ``oscillating_loss``) — is a ``warning``.

    **Fixes.** Lower the learning rate (a value is proposed from how far the first updates moved the
    weights), add a warmup for attention models, clip the gradient norm at the healthy 90th percentile
    (first for recurrent networks), standardise inputs that are far from unit scale.
    """

    code = "exploding_loss"

    @dataclass(frozen=True)
    class Config:
        threshold_decades: float = 1.0  # 10× above the healthy level: healthy runs (small batches, schedules, warmup) measured ≤ 0.9 decades; lr 10-100× too high 2-23
        noise_sigmas: float = 4.0  # for very noisy losses, at least 4 robust σ of the curve's own noise (normal noise exceeds 4σ twice in a row ~1e-9 of the time)
        min_steps: int = 2  # two consecutive steps above the threshold: one bad batch is a spike, two is a trend
        threshold_linear: float = 5.0  # for losses that can be ≤ 0: 5 robust spreads above the healthy level
        recovered_fraction: float = 0.25  # recovered: back within 25% of the way from the pre-excursion level to the start…
        recovered_gain_decades: float = 0.1  # …and ≥ 0.1 decades (~20%) below the start, i.e. learning again

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        lv = loss_view(run)
        y = lv.values[lv.finite_rows]
        if y.size < 3:
            return
        p = lv.progress
        noise = p.noise if np.isfinite(p.noise) else 0.0
        base = cfg.threshold_decades if lv.is_log else cfg.threshold_linear
        threshold = max(base, cfg.noise_sigmas * noise)
        episodes = loss_excursions(y, window=p.window, threshold=threshold, min_points=cfg.min_steps)
        f = A.facts(run)
        if episodes:
            yield self._excursion_finding(run, lv, f, episodes, threshold)
            return
        swinging = np.isfinite(lv.recent_noise) and lv.recent_noise >= A.ERRATIC_SWING_DECADES
        if lv.worse and lv.is_log and not lv.improving and not swinging:
            yield self._worsening_finding(run, lv, f)

    def _recovered(self, lv: LossView, last: LossExcursion, y: np.ndarray) -> bool:
        cfg = self.config
        p = lv.progress
        if last.end >= y.size - 1:
            return False  # still up there at the last finite step
        if lv.nonfinite_now or lv.flatlined:
            return False  # non-finite, or back down but frozen: nothing learns any more
        after = y[last.end + 1 :]
        w = min(p.window, after.size)
        if w < 1:
            return False
        recent = float(np.median(after[-w:]))
        start = p.start
        tolerance = max(0.1 if lv.is_log else 1.0, cfg.recovered_fraction * max(start - last.reference, 0.0))
        gain = cfg.recovered_gain_decades if lv.is_log else 1.0
        return bool(recent <= last.reference + tolerance and start - recent >= gain)

    def _excursion_finding(
        self, run: Run, lv: LossView, f: A.RunFacts, episodes: list[LossExcursion], threshold: float
    ) -> Finding:
        y = lv.values[lv.finite_rows]
        first, last = episodes[0], episodes[-1]
        recovered = self._recovered(lv, last, y)
        row0 = int(lv.finite_rows[first.onset])
        step = step_at(run, row0)
        last_step = step_at(run, int(lv.finite_rows[last.end]))
        growth = max(e.peak - e.reference for e in episodes)
        p = lv.progress
        unit = "decades" if lv.is_log else "spreads"
        before = self._raw(lv, first.reference)
        peak = float(np.nanmax(lv.raw[lv.finite_rows[first.onset : last.end + 1]]))
        recent_raw = F.nan_median(lv.raw[lv.finite_rows[-p.window :]]) if not lv.nonfinite_now else math.nan
        lr = f.lr_at(row0)
        evidence = {
            "loss_before": before,
            "loss_peak": peak,
            "loss_recent": recent_raw,
            "growth_decades" if lv.is_log else "growth_spreads": float(growth),
            "threshold": float(threshold),
            "excursions": len(episodes),
            "recovered": int(recovered),
            "lr_at_onset": lr,
        }
        if recovered:
            severity = Severity.INFO
            message = (
                f"the loss jumped {F.format_number(growth)} {unit} above its level of {F.format_number(before, 3)} at step "
                f"{step} (peak {F.format_number(peak, 3)}) and recovered"
            )
        else:
            severity = Severity.ERROR
            now = (
                "it is now non-finite"
                if lv.nonfinite_now
                else f"it stands at {F.format_number(recent_raw, 3)} and has not recovered"
            )
            message = (
                f"the loss diverged from step {step}: from {F.format_number(before, 3)} to a peak of "
                f"{F.format_number(peak, 3)} ({F.format_number(growth)} {unit} up); {now}"
            )
        causes = A.likely_causes(f, step=step, diverged=True, explosion_before=row0)
        fixes = A.ranked_fixes([c.fix for c in causes], [A.clip_fix(f, before=row0)])
        return Finding(
            code=self.code,
            severity=severity,
            step=step,
            last_step=last_step,
            layers=tuple(f.grad_rise_layers(row0 + (1 if row0 + 1 < run.n_steps else 0))[:8]),
            message=message,
            evidence=evidence,
            fixes=fixes,
        )

    def _worsening_finding(self, run: Run, lv: LossView, f: A.RunFacts) -> Finding:
        p = lv.progress
        row0 = lv.worsening_onset_row
        step = step_at(run, row0)
        best, recent = 10**p.best, 10**p.recent
        message = (
            f"the loss has been climbing since step {step}: from its best of {F.format_number(best, 3)} to "
            f"{F.format_number(recent, 3)} ({F.format_number(100 * p.regress, 2)}% of the progress lost)"
        )
        causes = A.likely_causes(f, step=step, diverged=True, explosion_before=row0)
        fixes = A.ranked_fixes([c.fix for c in causes], [A.clip_fix(f, before=row0)])
        return Finding(
            code=self.code,
            severity=Severity.WARNING,
            step=step,
            last_step=step_at(run, int(lv.finite_rows[-1])),
            message=message,
            evidence={
                "loss_best": best,
                "loss_recent": recent,
                "progress_lost_fraction": float(p.regress),
                "lr": f.lr_at(),
            },
            fixes=fixes,
        )

    @staticmethod
    def _raw(lv: LossView, level: float) -> float:
        if lv.is_log:
            return float(10**level)
        # Linear losses: report the raw value nearest to that transformed level.
        vals = lv.values[lv.finite_rows]
        i = int(np.argmin(np.abs(vals - level)))
        return float(lv.raw[lv.finite_rows[i]])
