"""``exploding_gradients``: gradient norms jump far above their usual level or grow without bound."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gradscope.detect import advice as A
from gradscope.detect import functional as F
from gradscope.detect.base import Detector
from gradscope.detect.rules._common import loss_view, step_at
from gradscope.findings import Finding, Severity
from gradscope.store.run import Run

__all__ = ["ExplodingGradients"]


class ExplodingGradients(Detector):
    """The gradient norm jumped far above its usual level, or kept growing by orders of magnitude.

    **Symptom.** The global gradient norm spikes by 100× or more in one step, or climbs steadily by
    several orders of magnitude; the loss often jumps with it, or goes NaN a few steps later.

    **Why it matters.** An update proportional to an exploded gradient throws the weights far from
    where training had brought them: the loss blows up, units die, or a recurrent net saturates
    and stops learning.

    **Rule.** On log10 of the global gradient norm: a *spike* is a step ≥ ``spike_decades`` decades above
    the median of its neighbours (``half_window`` steps each side, so step 0 is judged too); a
    *growth* is the rolling median (``smooth_steps``) standing ≥ ``growth_decades`` above the lower of
    the first steps' level and its running minimum. The layers named are those whose own gradient
    jumped most at that step. ``error`` when the loss blew up or is non-finite now, ``warning`` when the
    loss is stalled or worse, ``info`` when training carried on (gradient norms of healthy LSTMs
    and transformers do rise while they learn).

    **Fixes.** Recurrent networks: clip the gradient norm (``clip_grad_norm_`` with ``max_norm`` at the
    90th percentile of the healthy norm). Otherwise: lower the learning rate (a value is proposed), then
    clip; re-initialise weights that start too large; standardise unnormalised inputs.
    """

    code = "exploding_gradients"

    @dataclass(frozen=True)
    class Config:
        spike_decades: float = 2.0  # 100× the neighbours' level in one step: healthy LSTM/GRU/transformer/small-batch/AMP runs measured ≤ 1 decade; an RNN thrown into saturation 2.5, lr 10-100× too high 2.5-15
        half_window: int = 10  # the neighbourhood of a step for the spike test: 10 steps on each side
        growth_decades: float = 3.0  # 1000× sustained growth: healthy LSTMs grow their gradient norm ~2 decades while they learn
        smooth_steps: int = 5  # growth is read on a 5-step rolling median, so a single spike does not count twice

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        n = run.n_steps
        if n < 3 or "global_grad_norm" not in run.metrics:
            return
        lg = F.log10_positive(run.grad_norm)
        if np.isfinite(lg).sum() < 3:
            return
        jump = F.centered_jump(lg, cfg.half_window, min_periods=3)
        spike_rows = np.flatnonzero(np.nan_to_num(jump, nan=-np.inf) >= cfg.spike_decades)
        smooth = F.rolling_median(lg, cfg.smooth_steps, min_periods=1)
        first = F.nan_median(lg[: max(3, min(cfg.half_window, n))])
        running = np.fmin.accumulate(np.where(np.isfinite(smooth), smooth, np.inf))
        reference = np.minimum(running, first) if np.isfinite(first) else running
        growth = smooth - reference
        growth_rows = np.flatnonzero(np.nan_to_num(growth, nan=-np.inf) >= cfg.growth_decades)
        if not spike_rows.size and not growth_rows.size:
            return
        kind = "spike" if spike_rows.size and (not growth_rows.size or spike_rows[0] <= growth_rows[0]) else "growth"
        row = int(spike_rows[0] if kind == "spike" else growth_rows[0])
        size = float(jump[row] if kind == "spike" else growth[row])
        biggest = float(np.nanmax(np.concatenate([jump[spike_rows], growth[growth_rows]])))
        step = step_at(run, row)
        f = A.facts(run)
        lv = loss_view(run)
        blew_up = f.loss_blew_up or lv.nonfinite_now
        # still up at the last finite loss: not recovered, however short the run (as exploding_loss reads it)
        still_up = bool(f.excursions) and f.excursions[-1].end >= lv.finite_rows.size - 1
        if blew_up and (lv.suffers or still_up):
            severity = Severity.ERROR
        elif lv.suffers:
            severity = Severity.WARNING
        else:
            severity = Severity.INFO
        layers = f.grad_rise_layers(row, self.config.half_window)
        typical = 10 ** F.nan_median(lg)
        value = float(run.grad_norm[row]) if np.isfinite(run.grad_norm[row]) else math.nan
        what = (
            f"jumped to {F.format_number(value, 3)}, {F.format_number(10**size)}× its neighbours' level"
            if kind == "spike"
            # smooth is a trailing median: its level at the step, not the step's own value
            else f"grew to a level of {F.format_number(10 ** smooth[row], 3)} (median of the last {cfg.smooth_steps} steps), "
            f"{F.format_number(10**size)}× its early level,"
        )
        outcome = {
            Severity.ERROR: "the loss blew up with it",
            Severity.WARNING: "the loss has not improved since",
            Severity.INFO: "training carried on",
        }[severity]
        where = f" (most in {', '.join(f'`{layer}`' for layer in layers[:3])})" if layers else ""
        message = f"the gradient norm {what} at step {step}{where}; {outcome}"
        evidence = {
            "grad_norm_at_step": value,
            "grad_norm_typical": float(typical),
            "jump_decades" if kind == "spike" else "growth_decades": size,
            "largest_decades": biggest,
            "spikes": int(spike_rows.size),
            "lr": f.lr_at(row),
        }
        causes = A.likely_causes(f, step=step, diverged=blew_up, explosion_before=row)
        fixes = A.ranked_fixes([c.fix for c in causes], [A.clip_fix(f, before=row)])
        yield Finding(
            code=self.code,
            severity=severity,
            step=step,
            last_step=step_at(run, int(max(spike_rows.max() if spike_rows.size else row, growth_rows.max() if growth_rows.size else row))),
            layers=tuple(layers[:8]),
            message=message,
            evidence=evidence,
            fixes=fixes,
        )
