"""``accumulating_gradients``: gradients that are never reset, so each step adds to the last."""

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

__all__ = ["AccumulatingGradients"]


class AccumulatingGradients(Detector):
    """The gradients are never reset between optimizer steps: each backward adds to the last.

    **Symptom.** From the first step on, a layer's gradient norm grows on nearly every step, steadily,
    whatever the batch: it is the running sum of every gradient so far, not this batch's.

    **Why it matters.** ``backward()`` adds into ``.grad``. Without ``optimizer.zero_grad()`` each step,
    the optimizer applies the sum of all past gradients: the steps grow, point where the model was
    long ago, and the run diverges or stalls. Lowering the learning rate only delays it.

    **Rule.** Over the first ``window`` steps (with a gradient on each), a layer whose gradient norm
    rose from one step to the next on ≥ ``rising_share`` of them and grew ≥ ``min_growth_decades``
    decades in all, slowing down as a sum does (the second half of the window adds at most
    ``max_second_half_share`` of the first half's growth, in log; a blow-up or an escape from a
    plateau grows exponentially, at an even pace or faster). A batch's gradient norm goes up or down from step to step with the batch: on
    healthy runs (noisy or full-batch, SGD or Adam, MLPs, CNNs, RNNs, transformers) it rose on at most
    ~65% of the first 60 steps, where a sum of gradients rises on 80-100%. Layers whose parameters are
    not in the optimizer are left to ``no_update`` (``optimizer.zero_grad()`` never resets them either,
    and their weights never move). ``warning``; ``error`` when the loss also blew up or is stalled.

    **Fixes.** Call ``optimizer.zero_grad()`` once per step, before ``backward()`` (with gradient
    accumulation: after each ``optimizer.step()``).
    """

    code = "accumulating_gradients"

    @dataclass(frozen=True)
    class Config:
        window: int = 60  # steps read from the start: a missing zero_grad shows from the first one
        rising_share: float = 0.75  # healthy runs measured ≤ 0.65 per layer over the first 60 steps; gradients never reset 0.82-1.0 (p ≈ 5e-5 of ≥ 45/60 rises for independent batches)
        min_growth_decades: float = 0.5  # and ≥ 3× in all: the sum of similar gradients grows ~linearly with the step
        max_second_half_share: float = 0.5  # a sum from step 0 grows log(60/30) = 0.3 decades in the second half against log(30) = 1.5 in the first; measured 0.1-0.3 of it

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        if run.n_steps <= cfg.window or "grad_norm" not in run.metrics:
            return
        f = A.facts(run)
        lg = f.log_grad(slice(0, cfg.window + 1))
        if lg.shape[0] <= cfg.window or lg.shape[1] == 0:
            return
        values = lg.to_numpy(dtype=np.float64)
        complete = np.isfinite(values).all(axis=0)  # a gradient on every step of the window
        half = cfg.window // 2
        with np.errstate(invalid="ignore"):
            rising = (np.diff(values, axis=0) > 0).mean(axis=0)
            growth = values[-1] - values[0]
            # A running sum grows about linearly with the step, so in log it slows down: the second half
            # of the window adds well under what the first did. A blow-up, or a model leaving a plateau,
            # grows exponentially (equal halves) or faster.
            slowing = (values[-1] - values[half]) <= cfg.max_second_half_share * (values[half] - values[0])
        hit = complete & (rising >= cfg.rising_share) & (growth >= cfg.min_growth_decades) & slowing
        outside = f.layers_outside_the_optimizer
        layers = [str(layer) for layer, h in zip(lg.columns, hit, strict=True) if h and str(layer) not in outside]
        if not layers:
            return
        at = {str(layer): i for i, layer in enumerate(lg.columns)}
        share = float(np.mean([rising[at[layer]] for layer in layers]))
        grew = float(np.max([growth[at[layer]] for layer in layers]))
        lv = loss_view(run)
        severity = Severity.ERROR if (f.loss_blew_up or lv.nonfinite_now or lv.suffers) else Severity.WARNING
        names = A.describe_modules(layers, f.types)
        message = (
            f"the gradient of {names} grew on {F.format_number(100 * share, 2)}% of the first {cfg.window} steps, "
            f"{F.format_number(10**grew)}× in all: gradients are not reset between steps, so each one adds to the last"
        )
        fix = Fix(
            FixKind.CODE,
            "Call `optimizer.zero_grad()` once per step, before `loss.backward()`: `backward()` adds into `.grad`, so "
            "without it every update applies the sum of all past gradients (with gradient accumulation, zero them after "
            "each `optimizer.step()`). Lowering the learning rate only delays the divergence.",
        )
        yield Finding(
            code=self.code,
            severity=severity,
            step=step_at(run, 0),
            last_step=step_at(run, cfg.window),
            layers=tuple(layers[:12]),
            message=message,
            evidence={"rising_share": share, "growth_decades": grew, "window": cfg.window, "layers": len(layers)},
            fixes=(fix,),
        )

