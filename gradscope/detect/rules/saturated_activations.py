"""``saturated_activations``: sigmoid/tanh/softmax outputs pinned at their bounds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gradscope.detect import advice as A
from gradscope.detect import functional as F
from gradscope.detect.base import Detector
from gradscope.detect.rules._common import loss_view, sustained_above
from gradscope.findings import Finding, Severity
from gradscope.store.run import Run

__all__ = ["SaturatedActivations"]


class SaturatedActivations(Detector):
    """Hidden sigmoid/tanh/softmax units sit at their bounds, where they pass back almost no gradient.

    **Symptom.** ``act_saturated_frac`` — the share of a bounded activation's outputs within 1% of its
    range from a bound (softmax: rows with one entry above 0.99) — stays high.

    **Why it matters.** A sigmoid at 0.99 passes back under 4% of the gradient it would at its centre;
    a saturated layer stops learning and starves the layers before it.

    **Rule.** For each bounded activation module that is not the model's output (a confident final
    sigmoid/softmax is what training aims for), over the last ``window_fraction`` of the sampled steps
    (at least ``min_samples``): the median saturated share is ≥ ``saturated_fraction`` and it was at least that on
    ≥ ``sustained_share`` of the samples. ``warning`` when the loss is stalled or getting worse, ``info``
    otherwise.

    **Fixes.** Standardise inputs that are far from unit scale; re-initialise weights that start too
    large; ReLU/GELU instead of sigmoid/tanh; BatchNorm/LayerNorm before the activation.
    """

    code = "saturated_activations"

    @dataclass(frozen=True)
    class Config:
        saturated_fraction: float = 0.5  # half the outputs at a bound: healthy shallow sigmoid/tanh nets measured ≤ 1%; behind unnormalised inputs or std=1 weights 84-100%
        sustained_share: float = 0.8  # saturated on 80% of the recent samples: a persistent state, not one odd batch
        min_samples: int = 3  # 3 sampled steps before judging
        window_fraction: float = 0.25  # the recent window: the last quarter of the sampled steps, the current state

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        f = A.facts(run)
        frame = f.act("act_saturated_frac")
        modules = [m for m in f.saturating_modules if m in frame.columns and m != f.output_module]
        found = sustained_above(
            frame, modules, cfg.saturated_fraction,
            min_samples=cfg.min_samples, window_fraction=cfg.window_fraction, sustained_share=cfg.sustained_share,
        )  # fmt: skip
        if found is None:
            return
        hits, ranked, step = found.fractions, found.ranked, found.step
        lv = loss_view(run)
        severity = Severity.WARNING if lv.suffers else Severity.INFO
        top = ranked[0]
        inputs = f" The input batch is far from unit scale ({f.input_text()})." if f.input_unnormalised else ""
        message = (
            f"{F.format_number(100 * hits[top])}% of the outputs of `{top}` ({f.types.get(top, '')}) sit at its bounds "
            f"since step {step}" + (f"; {len(ranked) - 1} more layer(s) too" if len(ranked) > 1 else "") + "." + inputs
        )
        evidence = {
            "saturated_fraction": hits[top],
            "saturated_layers": len(ranked),
            "input_std": f.input_std,
            "input_max_abs": f.input_max_abs,
            "init_gain_decades": f.init_gain,
        }
        causes = A.likely_causes(f, step=step)
        fixes = [c.fix for c in causes]
        fixes.append(A.activation_fix(f, ranked, "most outputs sit at the bounds, where the derivative is ~0"))
        fixes.append(A.normalization_fix(f, "each Linear/Conv layer, before the activation"))
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
