"""``no_gradient``: trainable parameters that never receive a gradient, or only zeros."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gradscope.detect import advice as A
from gradscope.detect import functional as F
from gradscope.detect.base import Detector
from gradscope.detect.rules._common import step_at
from gradscope.findings import Finding, Fix, FixKind, Severity
from gradscope.store.run import Run

__all__ = ["NoGradient"]


class NoGradient(Detector):
    """Parameters that require grad but never get a gradient, or get one that is exactly zero.

    **Symptom.** After ``backward()`` a parameter's ``.grad`` is ``None`` on (almost) every step — it is
    not in the graph of the loss — or its gradient is identically zero.

    **Why it matters.** Those weights never train. A missing gradient means part of the model is cut
    off from the loss (a ``.detach()``, a ``torch.no_grad()`` block, a branch whose output is unused);
    an all-zero one means something upstream blocks it (dead ReLUs, all-zero weights, a multiplication
    by 0).

    **Rule.** Over the recorded steps (at least ``min_steps``): a tracked parameter whose gradient was
    missing on ≥ ``share`` of them, or present but exactly zero on ≥ ``share`` of them (an exact zero
    count is the one place an equality test on floats is right). Parameters with
    ``requires_grad=False`` are not tracked, so frozen layers are never flagged. ``warning``: part of
    the model does not learn.

    **Fixes.** Missing → find the ``.detach()``/``no_grad``/unused output on the path from these modules to
    the loss, or freeze them explicitly (``requires_grad_(False)``). Zero → the dead units or all-zero
    weights that block it.
    """

    code = "no_gradient"

    @dataclass(frozen=True)
    class Config:
        share: float = 0.95  # missing or zero on 95% of the steps: a branch used only on some steps still gets gradients regularly
        min_steps: int = 10  # 10 steps before judging: the first steps of lazily built modules can lack gradients

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        n = run.n_steps
        if n < cfg.min_steps or "param_grad_missing" not in run.metrics:
            return
        # Raw float32 arrays, not frames: this reads every parameter's series, the largest block of a run.
        missing, missing_names = run.metric_array("param_grad_missing")
        layer_of = A.facts(run).layer_of
        absent = missing > 0  # NaN (not recorded) counts as present, as 0 does
        miss_share = absent.mean(axis=0)
        missing_params = [p for p, s in zip(missing_names, miss_share, strict=True) if s >= cfg.share]
        zero_params: list[str] = []
        norm_names: list[str] = []
        if "param_grad_norm" in run.metrics:
            values, norm_names = run.metric_array("param_grad_norm")
            if norm_names != missing_names:
                position = {p: i for i, p in enumerate(missing_names)}
                absent = np.stack([absent[:, position[p]] if p in position else np.zeros(len(absent), dtype=bool) for p in norm_names], axis=1)
            present = ~absent
            zero = present & (values == 0)
            counted = present.sum(axis=0)
            share_zero = np.divide(zero.sum(axis=0), counted, out=np.zeros(values.shape[1]), where=counted > 0)
            zero_params = [p for p, s, c in zip(norm_names, share_zero, counted, strict=True) if c >= cfg.min_steps and s >= cfg.share]
        f = A.facts(run)
        if missing_params:
            yield self._finding(run, f, missing_params, layer_of, kind="missing", share=miss_share, columns=missing_names)
        if zero_params:
            yield self._finding(run, f, zero_params, layer_of, kind="zero", share=None, columns=norm_names)

    def _finding(
        self,
        run: Run,
        f: A.RunFacts,
        params: list[str],
        layer_of: dict[str, str],
        *,
        kind: str,
        share: np.ndarray | None,
        columns: list[str],
    ) -> Finding:
        layers: list[str] = []
        for p in params:
            layer = layer_of.get(p, p.rsplit(".", 1)[0] if "." in p else "")
            if layer not in layers:
                layers.append(layer)
        order = {m: i for i, m in enumerate(f.order)}
        layers.sort(key=lambda m: order.get(m, len(order)))
        numel = dict(zip(run.meta.get("params", []), run.meta.get("param_numels", []), strict=False))
        n_values = int(sum(int(numel.get(p, 0)) for p in params))
        total = int(sum(int(v) for v in numel.values())) or 1
        shown = ", ".join(f"`{p}`" for p in params[:4]) + (f" and {len(params) - 4} more" if len(params) > 4 else "")
        names = A.describe_modules(layers, f.types)
        if kind == "missing":
            message = (
                f"{len(params)} trainable parameter(s) never received a gradient ({shown}; {F.format_number(100 * n_values / total)}% "
                f"of the trainable values): {names} — cut off from the loss"
            )
            fixes = [
                Fix(
                    FixKind.CODE,
                    f"{names} gets no gradient: look for a `.detach()`, a `torch.no_grad()` block, `.data`, a conversion "
                    "through numpy/`.item()`, or an output that never reaches the loss on the path from it to the loss. "
                    "If it is meant to stay fixed, freeze it explicitly: `module.requires_grad_(False)`.",
                ),
                Fix(
                    FixKind.ARCHITECTURE,
                    f"If {names} is an unused branch, remove it (or call it in forward()), so that the optimizer and "
                    "DistributedDataParallel do not carry dead weights.",
                ),
            ]
        else:
            message = (
                f"{len(params)} trainable parameter(s) get a gradient that is exactly zero on every step ({shown}): "
                f"{names} — not learning"
            )
            fixes = self._zero_fixes(run, f, layers)
        step = step_at(run, self._onset(run, params, kind))
        evidence = {
            "parameters": len(params),
            "values": n_values,
            "share_of_trainable": n_values / total,
            "steps": run.n_steps,
        }
        return Finding(
            code=self.code,
            severity=Severity.WARNING,
            step=step,
            last_step=step_at(run, run.n_steps - 1),
            layers=tuple(layers[:12]),
            message=message,
            evidence=evidence,
            fixes=A.ranked_fixes(fixes),
        )

    @staticmethod
    def _onset(run: Run, params: list[str], kind: str) -> int:
        """First row from which the flagged parameters lacked a (non-zero) gradient until the end."""
        values, names = run.metric_array("param_grad_missing" if kind == "missing" else "param_grad_norm")
        position = {p: i for i, p in enumerate(names)}
        columns = (values[:, position[p]] for p in params)  # one at a time: no copy of every flagged parameter's series
        starts = [F.last_sustained_start(column > 0 if kind == "missing" else column == 0) for column in columns]
        known = [s for s in starts if s is not None]
        return min(known) if known else 0

    def _zero_fixes(self, run: Run, f: A.RunFacts, layers: list[str]) -> list[Fix]:
        fixes: list[Fix] = []
        dead = {m for m, v in f.dead_fractions.items() if v >= A.DEAD_CAUSE_FRACTION}
        order = f.order
        blocked = []
        for layer in layers:
            if layer in order:
                after = order[order.index(layer) + 1 : order.index(layer) + 4]
                blocked += [m for m in after if m in dead]
        # A gradient that is exactly zero is blocked upstream: by dead ReLUs, saturated units (tanh and
        # sigmoid derivatives round to 0 in float32 beyond |x| ≈ 9 and 17), or weights that were
        # thrown there by an explosion. Those causes come first.
        causes = A.likely_causes(f)
        strong = {"init_zero", "lr_too_high", "dead_units", "dead_init", "init_too_small", "init_too_large",
                  "exploding_recurrence", "gradient_spike", "saturating_activations", "inputs_unnormalised"}
        fixes += [c.fix for c in causes if c.name in strong]
        if blocked:
            fixes.append(A.dead_relu_fix(f, sorted(set(blocked), key=order.index)))
        fixes.append(
            Fix(
                FixKind.CODE,
                "Something multiplies these parameters' contribution by zero: check masks, gates, `* 0` "
                "placeholders and `torch.where` branches that are never taken.",
            )
        )
        return fixes
