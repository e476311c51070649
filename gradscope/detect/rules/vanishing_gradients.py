"""``vanishing_gradients``: early layers get orders of magnitude less gradient than late ones."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gradscope.detect import advice as A
from gradscope.detect import functional as F
from gradscope.detect.base import Detector
from gradscope.detect.rules._common import loss_view, step_at
from gradscope.findings import Finding, Fix, FixKind, Severity
from gradscope.store.run import Run

__all__ = ["VanishingGradients"]


class VanishingGradients(Detector):
    """Gradients shrink by orders of magnitude on their way from the output back to the first layers.

    **Symptom.** The gradient norm of the first layers is 1000× (or far more) smaller than that of the
    layers near the output; the early layers' weights barely move.

    **Why it matters.** Layers that receive no gradient do not learn: a deep network behaves like its
    last few layers on top of fixed random features, and the loss stalls.

    **Rule.** Over the last ``window_fraction`` of the run (5-2000 steps), take each layer's median log10 gradient
    norm (layers owning parameters, in forward order; normalisation and embedding layers are left out,
    their gradients live on another scale). A layer's *deficit* is how many decades it sits below the
    best-fed layer after it. Vanishing when some layer's deficit is ≥ ``min_decades``; the first step is
    where the per-step deficit first stayed above it for ``min_steps`` steps. ``warning`` when the loss
    is stalled or getting worse, ``info`` while it still improves.

    **Fixes.** From the model's modules: replace sigmoid/tanh stacks by ReLU/GELU; add
    BatchNorm/LayerNorm or residual connections when there is no normalisation; re-initialise weights
    that shrink the signal (He/Xavier); for attention models without warmup, add a warmup.
    """

    code = "vanishing_gradients"

    @dataclass(frozen=True)
    class Config:
        min_decades: float = 2.5  # ~300× less gradient than a later layer: healthy deep nets (residual, transformer, 8-layer ReLU, Xavier tanh) measured ≤ 1 decade; 10 sigmoids 6.8, 15 default-init tanh 2.8
        min_steps: int = 5  # the per-step deficit must hold 5 consecutive steps to date the onset: one noisy step is not a trend
        window_fraction: float = 0.25  # the profile is read over the last quarter of the run: the current state, past any brief early imbalance

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        f = A.facts(run)
        n = f.grad_rows
        if n < 2:
            return
        w = F.window_length(n, cfg.window_fraction, 5, 2000)
        recent = f.log_grad(slice(n - w, None))
        if recent.shape[1] < 2:
            return
        layers, deficit = A.vanishing_profile_of(recent)
        if not deficit.size or not np.isfinite(deficit).any() or np.nanmax(deficit) < cfg.min_decades:
            return
        worst = float(np.nanmax(deficit))
        starved = [layers[i] for i in np.argsort(-np.nan_to_num(deficit, nan=-np.inf)) if np.isfinite(deficit[i]) and deficit[i] >= cfg.min_decades]
        # The best-fed layer after the most starved one: what it is compared with.
        worst_i = int(np.nanargmax(deficit))
        profile = recent.median(skipna=True).to_numpy(dtype=np.float64)
        after = profile[worst_i + 1 :]
        ref_i = worst_i + 1 + int(np.nanargmax(after)) if np.isfinite(after).any() else worst_i
        reference = layers[ref_i]
        # Date the onset on per-step deficits (row by row, so a long run goes in blocks of rows).
        step_max = np.concatenate(
            [_worst_deficit(f.log_grad(slice(start, start + A.BLOCK_ROWS)).to_numpy(dtype=np.float64)) for start in range(0, n, A.BLOCK_ROWS)]
        )
        onset = F.first_sustained(step_max >= cfg.min_decades, cfg.min_steps)
        step = step_at(run, onset if onset is not None else n - w)

        lv = loss_view(run)
        severity = Severity.WARNING if lv.suffers else Severity.INFO
        ratio = 10 ** (-worst)
        sat = [m for m in f.saturating_modules if m != f.output_module]
        kinds = f" ({A.describe_modules(sat, f.types)} in between)" if sat else ""
        message = (
            f"the gradient at `{starved[0]}` is {F.format_number(ratio)} of `{reference}`'s "
            f"({F.format_number(worst)} decades lost{kinds}); {len(starved)} layer(s) get ≥ "
            f"{F.format_number(10 ** cfg.min_decades)}× less gradient than a later layer"
        )
        grad_first = float(10 ** profile[worst_i]) if np.isfinite(profile[worst_i]) else float("nan")
        grad_ref = float(10 ** profile[ref_i]) if np.isfinite(profile[ref_i]) else float("nan")
        evidence = {
            "decades_lost": worst,
            "grad_norm_starved": grad_first,
            "grad_norm_reference": grad_ref,
            "starved_layers": len(starved),
            "init_gain_decades": f.init_gain,
            "update_ratio_starved": F.nan_median(f.update_ratio_of(starved[0])) if starved[0] in f.update_ratio(slice(0, 0)) else float("nan"),
        }
        causes = A.likely_causes(f, step=step)
        earliest = min(starved, key=layers.index)  # starved is ranked by deficit; the span starts in forward order
        extra = [
            Fix(
                FixKind.ARCHITECTURE,
                f"Add residual connections around the blocks between `{earliest}` and `{reference}` "
                "so the gradient has a short path to the early layers.",
            ),
            A.init_fix(f, "small") if np.isfinite(f.init_gain) and f.init_gain < -0.15 and not f.has_norm else None,
        ]
        yield Finding(
            code=self.code,
            severity=severity,
            step=step,
            last_step=step_at(run, n - 1),
            layers=tuple(starved[:12]),
            message=message,
            evidence=evidence,
            fixes=A.ranked_fixes([c.fix for c in causes], [A.normalization_fix(f)], extra),
        )


def _worst_deficit(log_grad: np.ndarray) -> np.ndarray:
    """Per row of a ``rows × layers`` log10 gradient norm (layers in forward order): the most decades
    any layer lies below the best-fed layer after it (``-inf`` when no pair is finite)."""
    clean = np.where(np.isfinite(log_grad), log_grad, -np.inf)
    suffix = np.maximum.accumulate(clean[:, ::-1], axis=1)[:, ::-1]
    after_max = np.concatenate([suffix[:, 1:], np.full((len(log_grad), 1), -np.inf)], axis=1)
    with np.errstate(invalid="ignore"):
        per_step = np.where(np.isfinite(log_grad) & np.isfinite(after_max), after_max - log_grad, np.nan)
    worst: np.ndarray = np.nanmax(np.where(np.isfinite(per_step), per_step, -np.inf), axis=1)
    return worst
