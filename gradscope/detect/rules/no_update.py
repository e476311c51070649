"""``no_update``: trainable parameters that get gradients but never move."""

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

__all__ = ["NoUpdate"]


class NoUpdate(Detector):
    """Trainable parameters receive gradients but the optimizer never changes them.

    **Symptom.** A layer's gradient is non-zero, yet its weights are exactly the same after every
    optimizer step (‖Δθ‖ = 0).

    **Why it matters.** The parameters are not in the optimizer (it was built from a sub-module, or
    before a layer was added or replaced), or their param group has lr=0: that part of the model is
    frozen without saying so, while backward still pays for its gradients.

    **Rule.** With updates measured (an optimizer was given to the Monitor), over at least
    ``min_steps`` measured steps: a layer whose update norm is exactly zero (weights that did not change
    at all) on ≥ ``share`` of the steps where its gradient was non-zero. Parameters the Monitor saw outside the optimizer at the start
    are named too. ``warning`` when the loss is stalled or worse, ``info`` otherwise (freezing layers by
    leaving them out of the optimizer works, it is only implicit).

    **Fixes.** Build the optimizer from ``model.parameters()`` (or add a param group for them); if the
    freeze is deliberate, say so with ``requires_grad_(False)``, which also saves their backward.
    """

    code = "no_update"

    @dataclass(frozen=True)
    class Config:
        share: float = 0.95  # frozen on 95% of the steps with a gradient: optimizers that skip a few steps (GradScaler) still move the weights on the others
        min_steps: int = 10  # 10 measured steps before judging

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        if run.n_steps < cfg.min_steps or "update_norm" not in run.metrics or "grad_norm" not in run.metrics:
            return
        # The stored float32 arrays, not float64 frames: the tests below give the same answer on both.
        u, upd_layers = run.metric_array("update_norm")
        grad, grad_layers = run.metric_array("grad_norm")
        g = grad
        if grad_layers != upd_layers:
            position = {layer: i for i, layer in enumerate(grad_layers)}
            g = np.stack([grad[:, position[layer]] if layer in position else np.full(len(grad), np.nan, np.float32) for layer in upd_layers], axis=1)
        measured = np.isfinite(u) & np.isfinite(g) & (g > 0)
        counts = measured.sum(axis=0)
        frozen = (u == 0) & measured
        share = np.divide(frozen.sum(axis=0), counts, out=np.zeros(u.shape[1]), where=counts > 0)
        layers = [c for c, s, k in zip(upd_layers, share, counts, strict=True) if k >= cfg.min_steps and s >= cfg.share]
        not_in_opt = list(run.meta.get("params_not_in_optimizer") or [])
        if not layers:
            return
        f = A.facts(run)
        lv = loss_view(run)
        severity = Severity.WARNING if lv.suffers else Severity.INFO
        order = {m: i for i, m in enumerate(f.order)}
        layers.sort(key=lambda m: order.get(m, len(order)))
        names = A.describe_modules(layers, f.types)
        numel = dict(zip(run.meta.get("params", []), run.meta.get("param_numels", []), strict=False))
        frozen_values = sum(int(v) for p, v in numel.items() if f.layer_of.get(p) in set(layers))
        total = sum(int(v) for v in numel.values()) or 1
        why = (
            f"{len(not_in_opt)} of their parameters are not in the optimizer" if not_in_opt else "their param group never changes them (lr=0?)"
        )
        message = (
            f"{names} get gradients but their weights never change ({F.format_number(100 * frozen_values / total)}% of the "
            f"trainable values): {why}"
        )
        shown = ", ".join(f"`{p}`" for p in not_in_opt[:4]) + (" …" if len(not_in_opt) > 4 else "")
        fixes = [
            Fix(
                FixKind.CODE,
                f"Create the optimizer from all trainable parameters, `{f.optimizer_class}(model.parameters(), ...)`, or add a "
                f"param group for {names}{' (' + shown + ')' if not_in_opt else ''}; build it after the model is final.",
            ),
            Fix(
                FixKind.OPTIMIZER,
                f"If {names} is meant to stay frozen, call `requires_grad_(False)` on it: the freeze becomes explicit and "
                "backward stops computing its gradients.",
            ),
        ]
        yield Finding(
            code=self.code,
            severity=severity,
            step=step_at(run, 0),
            last_step=step_at(run, run.n_steps - 1),
            layers=tuple(layers[:12]),
            message=message,
            evidence={
                "layers": len(layers),
                "values": frozen_values,
                "share_of_trainable": frozen_values / total,
                "params_not_in_optimizer": len(not_in_opt),
            },
            fixes=tuple(fixes),
        )
