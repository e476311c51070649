"""``init_scale``: at initialisation, each layer blows up or shrinks the signal that passes through it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gradscope.detect import advice as A
from gradscope.detect import functional as F
from gradscope.detect.base import Detector
from gradscope.detect.rules._common import loss_view
from gradscope.findings import Finding, Severity
from gradscope.store.run import Run

__all__ = ["InitScale"]


class InitScale(Detector):
    """The initial weights are mis-scaled: every layer multiplies (or divides) its input's scale by a lot.

    **Symptom.** At the first step, the standard deviation of each Linear/Conv layer's output is many
    times larger (or smaller) than the root-mean-square of its input, so the signal grows (or fades)
    geometrically with depth: huge initial losses and gradients, saturated or dead units, or outputs
    and gradients that are ~0.

    **Why it matters.** Training starts far from the regime where gradients are informative; it either
    spends many steps undoing the scale or never recovers. He/Xavier init keep the scale per layer ~1.

    **Rule.** At the first sampled step (within the first ``max_first_step`` steps), for each Linear/Conv
    layer not followed directly by a normalisation layer: log10(output std / input rms). When the
    median over ≥ 2 layers is ≥ ``gain_decades`` (or ≤ -``gain_decades``), the init is mis-scaled.
    ``warning`` when the scale compounds to ≥ ``total_decades`` over a network without normalisation
    layers, or the loss suffers; ``info`` otherwise (normalisation and residual connections reset the
    scale, so GPT-style ``std=0.02`` init is not flagged unless the loss shows it). (PyTorch's default
    init measures -0.24 decades per layer, He init ~0.)

    **Fixes.** He (``kaiming_normal_``) init for ReLU-family networks, Xavier (``xavier_uniform_``) for
    tanh/sigmoid ones, zero biases; normalisation layers make a network robust to the init scale.
    """

    code = "init_scale"

    @dataclass(frozen=True)
    class Config:
        gain_decades: float = 0.7  # ≥ 5× (or ≤ 1/5) per layer: healthy inits measured -0.29 to +0.10 decades per layer; std=1 weights +1.05, std=1e-3 -1.96
        total_decades: float = 3.0  # compounded to 1000× over the network, the first losses and gradients are meaningless (or zero): a warning
        max_first_step: int = 10  # the statistics must come from the first steps to describe the initialisation

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        f = A.facts(run)
        gains = f.init_gains
        if len(gains) < 2:
            return
        median = float(np.median(list(gains.values())))
        if abs(median) < cfg.gain_decades:
            return
        direction = "large" if median > 0 else "small"
        off = [m for m, g in gains.items() if (g >= cfg.gain_decades if median > 0 else g <= -cfg.gain_decades)]
        total = float(sum(gains[m] for m in off))
        lv = loss_view(run)
        # Normalisation layers (and the residual connections that come with them in transformers) reset
        # the scale, so per-layer gains do not compound: GPT-style std=0.02 init is not a fault there
        # unless the loss shows it.
        compounds = abs(total) >= cfg.total_decades and not f.has_norm
        severity = Severity.WARNING if (compounds or lv.suffers) else Severity.INFO
        per_layer = 10**median
        message = (
            f"the initial weights are too {direction}: the first step each of {A.describe_modules(off, f.types)} "
            f"{'multiplies' if median > 0 else 'divides'} the scale of its input by ~{F.format_number(per_layer if median > 0 else 1 / per_layer)}, "
            f"{F.format_number(10 ** abs(total))}× over the network"
        )
        evidence = {"gain_decades_per_layer": median, "total_decades": total, "layers": len(off)}
        for m in off[:8]:
            evidence[f"gain_decades[{m}]"] = gains[m]
        fixes = [A.init_fix(f, direction), A.normalization_fix(f)]
        yield Finding(
            code=self.code,
            severity=severity,
            step=int(f.act("act_std").index[0]),
            layers=tuple(off[:12]),
            message=message,
            evidence=evidence,
            fixes=A.ranked_fixes(fixes),
        )
