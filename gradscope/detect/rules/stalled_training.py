"""``stalled_training``: the loss stopped improving while it has learned little."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gradscope.detect import advice as A
from gradscope.detect import functional as F
from gradscope.detect.base import Detector
from gradscope.detect.rules._common import loss_view, step_at, tail_trend
from gradscope.findings import Finding, Fix, FixKind, Severity
from gradscope.store.run import Run

__all__ = ["StalledTraining"]


class StalledTraining(Detector):
    """The loss has stopped improving while it is still close to where it started.

    **Symptom.** A flat loss curve at (or near) its initial value — for a classifier, often ln(number
    of classes), the loss of a model that predicts uniformly.

    **Why it matters.** Every further step is wasted compute; the cause (learning rate, gradients that
    do not reach the weights, dead or saturated units, parameters the optimizer does not own) will
    not go away by training longer.

    **Rule.** With at least ``min_steps`` finite losses, in log10 space: the robust (Theil–Sen) trend
    of the last two windows (a window is 10% of the run, 5-500 steps) changes the level over one
    window by no more than ``trend_sigmas`` standard errors (or 5%), down or up, so that the noise of
    small batches cannot pass for progress; it is not worse than its start by more than
    ``max_gain_decades`` and ``start_noise_sigmas`` times its noise (a divergence, left to
    ``exploding_loss``); *and* either the loss has gained less than
    ``max_gain_decades`` decades from its start (``max_gain_linear`` robust spreads for losses that
    can be ≤ 0), or less than ``partial_gain_decades`` while it has been
    on its plateau for ``plateau_share`` of the run or a cause is identified, or it is *flatlined* (the same on every batch to
    ±5% after gaining under 1.5 decades, as when the predictions no longer depend on the input). A run that
    converged (a large gain, flat near its minimum) is not stalled.
    While the learning rate is still ramping up (warmup), and for ``min_steps`` steps after it
    arrived, the rule waits. ``warning`` when a cause is identified (learning rate
    too low or too high, a learning-rate schedule that fell to 1% of its peak in the run's first
    half, weight decay that shrank the weights ≥ 3×, a model that ends in a Softmax or a ReLU, vanishing
    gradients, dead or saturated units, unnormalised inputs, parameters outside the optimizer), or
    when nothing was learned (gain under ``no_progress_decades``) over
    ``unexplained_steps`` flat steps; ``info`` otherwise (it may be the noise floor of a hard task).

    **Fixes.** Ranked from the run's evidence: raise a learning rate that moves the weights by under
    1e-4 of their norm per step (a value is proposed); lower one that killed units or blew up the loss;
    swap saturating activations or add normalisation when gradients vanish; fix the initialisation;
    standardise inputs; add the missing parameters to the optimizer; check where the scheduler steps;
    lower the weight decay (a value is proposed).
    """

    code = "stalled_training"

    @dataclass(frozen=True)
    class Config:
        min_steps: int = 50  # judge a plateau after 50 steps: a healthy run can be flat while Adam's moments or momentum build up
        max_gain_decades: float = 0.3  # under 0.3 decades (2×) of gain the run learned little; healthy runs measured ≥ 0.7 decades in a few hundred steps
        no_progress_decades: float = 0.05  # under 0.05 decades (~11%) nothing was learned: a warning even without an identified cause…
        unexplained_steps: int = 200  # …once the plateau has lasted 200 steps (some healthy tasks sit on a plateau for their first hundred)
        partial_gain_decades: float = 1.0  # under 1 decade and flat is a stall too with a cause in sight or a long plateau (healthy plateaus came after ≥ 2 decades, or had no cause: noise floors)
        plateau_share: float = 0.5  # "long": the plateau covers half the run
        max_gain_linear: float = 1.0  # for losses that can be ≤ 0: a gain under 1 robust spread
        # A flat noisy loss passes for a trend ≥ 3 SE in 0.25-0.45% of runs of ≥ 200 steps (1-2% at 50-100; 4,000 simulated
        # runs each), where the former 2-SE two-window test let 1 in 20 through (11 of 200 flat runs at σ=0.05 decades);
        # a real linear fall is still seen from 3.75σ/√w per window, against the 3.6σ/√w that test needed.
        trend_sigmas: float = 3.0  # still improving (or climbing) only with a tail trend ≥ 3 standard errors from flat
        # The start is 1-3 batches and reads ≥ 3.1σ low in 0.1% of runs (10^6 simulated starts); with a 0.3-decade limit
        # alone, flat losses at σ=0.2 and 0.4 decades read "worse than their start" in 6% and 27% of 200 runs.
        start_noise_sigmas: float = 3.1  # worse than its start is a divergence only beyond 3.1σ of noise on the start

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        lv = loss_view(run)
        p = lv.progress
        if p.n < cfg.min_steps or not np.isfinite(p.gain) or lv.nonfinite_now:
            return  # too short, or non-finite (nonfinite)
        noise = p.noise if np.isfinite(p.noise) else 0.0
        trend = tail_trend(lv.values[lv.finite_rows], p.window, min_noise=noise)
        if not np.isfinite(trend.change) or abs(trend.change) > max(A.IMPROVING_MIN_DECADES, cfg.trend_sigmas * trend.stderr):
            return  # still improving, or climbing (exploding_loss), by more than noise explains
        if -p.gain > max(cfg.max_gain_decades if lv.is_log else cfg.max_gain_linear, cfg.start_noise_sigmas * noise):
            return  # worse than where it started: a divergence (exploding_loss), not a stall
        f = A.facts(run)
        if not f.lr_settled_rows(cfg.min_steps):
            return  # warmup in progress: a flat loss is expected until the learning rate arrives
        smooth = lv.smooth
        # The plateau band: three standard errors of the rolling median the curve is smoothed with.
        band = max(0.02 if lv.is_log else 0.2, 3 * 1.25 * noise / np.sqrt(max(p.window, 1)))
        start_pos = F.plateau_start(smooth, p.recent, band) or 0
        plateau_rows = lv.finite_rows.size - start_pos
        limit = cfg.max_gain_decades if lv.is_log else cfg.max_gain_linear
        long_plateau = plateau_rows >= max(2 * cfg.min_steps, cfg.plateau_share * lv.finite_rows.size)
        partial = lv.is_log and p.gain < cfg.partial_gain_decades
        if not (p.gain < limit or lv.flatlined or partial):
            return
        row0 = int(lv.finite_rows[min(start_pos, lv.finite_rows.size - 1)])
        step = step_at(run, row0)
        causes = A.likely_causes(f, step=step)
        if partial and not (p.gain < limit or lv.flatlined or long_plateau or causes):
            return  # some progress, a short plateau and nothing wrong in sight: not a stall (yet)
        missing = list(run.meta.get("params_not_in_optimizer") or [])
        nothing = p.gain < (cfg.no_progress_decades if lv.is_log else 0.2 * cfg.max_gain_linear)
        confirmed = bool(causes or missing or (nothing and plateau_rows >= cfg.unexplained_steps))
        severity = Severity.WARNING if confirmed else Severity.INFO
        start_raw = float(10**p.start) if lv.is_log else F.nan_median(lv.raw[lv.finite_rows[: p.window]])
        recent_raw = float(10**p.recent) if lv.is_log else F.nan_median(lv.raw[lv.finite_rows[-p.window :]])
        # Not improving is judged over the last two windows: the plateau is at least one window long.
        plateau = max(int(run.steps[-1] - run.steps[row0]) + 1 if step is not None else 0, p.window)
        n = run.n_steps
        typical_ur = f.typical_update_ratio(slice(max(0, n - p.window), None))
        if nothing:
            how = "has not moved from its start"
        elif lv.is_log and start_raw > 0:
            how = f"has dropped only {F.format_number(100 * (1 - recent_raw / start_raw))}% from its start"
        else:
            how = "has stopped improving"
        frozen = (
            # A loss that no longer varies from batch to batch: what a model whose output ignores its
            # input gives, but also full-batch training, or a model at the floor of its loss (noisy
            # labels, soft targets): the message says what is measured and what it may mean.
            f"; it is the same on every batch (±{F.format_number(100 * (10 ** lv.recent_noise - 1))}%), as when the "
            "predictions no longer depend on the input (or the batch is the whole dataset, or the loss is at its floor)"
            if lv.flatlined
            else ""
        )
        message = (
            f"the loss {how}: {F.format_number(start_raw, 3)} → {F.format_number(recent_raw, 3)}, flat for the last "
            f"{plateau} steps{frozen}"
        )
        evidence = {
            "loss_start": start_raw,
            "loss_recent": recent_raw,
            "gain_decades" if lv.is_log else "gain_spreads": float(p.gain),
            "plateau_steps": plateau,
            "update_ratio": typical_ur,
            "lr": f.lr_at(),
            "params_not_in_optimizer": len(missing),
        }
        fixes = [c.fix for c in causes]
        if missing:
            shown = ", ".join(f"`{m}`" for m in missing[:4]) + (" …" if len(missing) > 4 else "")
            fixes.insert(
                0 if not causes else 1,
                Fix(
                    FixKind.CODE,
                    f"{len(missing)} trainable parameter(s) are not in the optimizer ({shown}): they get gradients but never "
                    "move. Build the optimizer from `model.parameters()` (or add a param group), or freeze them explicitly.",
                ),
            )
        fallback = [
            Fix(
                FixKind.LEARNING_RATE,
                f"No single cause stands out: with {f.lr_text()}, try a short sweep (×0.1, ×3, ×10) over a few hundred "
                "steps and keep the value whose loss falls fastest.",
            ),
            Fix(
                FixKind.DATA,
                "Check that inputs and labels match (a loss stuck at its starting value is what shuffled or "
                "constant labels give) and that the model can overfit a single batch.",
            ),
        ]
        yield Finding(
            code=self.code,
            severity=severity,
            step=step,
            last_step=step_at(run, int(lv.finite_rows[-1])),
            layers=tuple(f.implicated_layers[:12]),
            message=message,
            evidence=evidence,
            fixes=A.ranked_fixes(fixes if fixes else fallback),
        )
