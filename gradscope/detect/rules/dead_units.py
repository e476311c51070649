"""``dead_units``: ReLU-family units that output zero for every example, step after step."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gradscope.detect import advice as A
from gradscope.detect import functional as F
from gradscope.detect.base import Detector
from gradscope.detect.rules._common import loss_view, sustained_above
from gradscope.findings import Finding, Severity
from gradscope.store.run import Run

__all__ = ["DeadUnits"]


class DeadUnits(Detector):
    """A large share of a ReLU layer's units never activate: they output 0 for every example.

    **Symptom.** ``act_dead_frac`` — the fraction of units (features, or channels of a conv layer) that
    were zero for the whole batch — stays high on every sampled step.

    **Why it matters.** A dead ReLU passes no gradient, so the weights feeding it never change and it
    never comes back: the layer has lost that capacity for good. When whole layers die, the loss stalls.

    **Rule.** For each ReLU-family module (``ReLU``, ``ReLU6``, ``Threshold``), over the last
    ``window_fraction`` of the sampled steps (at least ``min_samples``): the median dead fraction is ≥ ``dead_fraction`` and
    it was at least that on ≥ ``sustained_share`` of those samples. The first step is where the dead
    fraction last rose above the threshold and stayed. ``warning`` when the loss is stalled or
    getting worse; ``info`` otherwise (a network can afford some dead units).

    **Fixes.** Units that died right after large updates → lower the learning rate (a value is
    proposed); dead from the first step → the initialisation (negative biases); then LeakyReLU/GELU,
    which keep a gradient for negative inputs, and normalisation before the activation.
    """

    code = "dead_units"

    @dataclass(frozen=True)
    class Config:
        dead_fraction: float = 0.5  # half the units dead: healthy ReLU nets measured ≤ 0.34 (mostly < 0.1); lr too high or negative biases 0.7-1.0
        sustained_share: float = 0.8  # dead on 80% of the recent samples: dead means dead every time, not one odd batch
        min_samples: int = 3  # 3 sampled steps (150 optimizer steps at the default early cadence, every 50) before judging
        window_fraction: float = 0.25  # the recent window: the last quarter of the sampled steps, the current state

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        f = A.facts(run)
        modules = f.dead_capable_modules
        frame = f.act("act_dead_frac")
        modules = [m for m in modules if m in frame.columns]
        if frame.empty or not modules:
            return
        nonfinite = f.act("act_nonfinite")
        if not nonfinite.empty:
            # A sample whose activations held NaN/Inf says nothing about dead units (nonfinite reports it).
            broken = nonfinite.reindex(index=frame.index).fillna(0).to_numpy().sum(axis=1) > 0
            frame = frame[~broken]
        found = sustained_above(
            frame, modules, cfg.dead_fraction,
            min_samples=cfg.min_samples, window_fraction=cfg.window_fraction, sustained_share=cfg.sustained_share,
        )  # fmt: skip
        if found is None:
            return
        hits, ranked, step = found.fractions, found.ranked, found.step
        lv = loss_view(run)
        severity = Severity.WARNING if lv.suffers else Severity.INFO
        top = ranked[0]
        killed = [m for m in ranked if m in set(f.dead_killed_by_updates)]
        cause = (
            f"; they died right after updates that moved the weights by ≥ {F.format_number(100 * A.KILLING_UPDATE_RATIO)}% of their norm ({f.lr_text()})"
            if killed
            else ""
        )
        message = (
            f"{F.format_number(100 * hits[top])}% of the units of `{top}` ({f.types.get(top, '')}) output zero for every "
            f"example since step {step}" + (f"; {len(ranked) - 1} more layer(s) above {F.format_number(100 * cfg.dead_fraction)}%" if len(ranked) > 1 else "")
            + cause
        )
        evidence = {"dead_fraction": hits[top], "dead_layers": len(ranked), "lr": f.lr_at(), "early_update_ratio": f.early_update_ratio}
        for m in ranked[:8]:
            evidence[f"dead_fraction[{m}]"] = hits[m]
        causes = A.likely_causes(f, step=step)
        fixes = [c.fix for c in causes]
        fixes.append(A.dead_relu_fix(f, ranked))
        fixes.append(A.normalization_fix(f, "each Linear/Conv layer, before the ReLU"))
        yield Finding(
            code=self.code,
            severity=severity,
            step=step,
            last_step=int(frame.index[-1]),
            layers=tuple(ranked[:12]),
            message=message,
            evidence=evidence,
            fixes=A.ranked_fixes(fixes),
        )
