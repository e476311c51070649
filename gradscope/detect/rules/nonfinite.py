"""``nonfinite``: NaN/Inf in the loss, gradients, parameters or module outputs, traced to where it began."""

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
from gradscope.store.schema import OUTPUT_LAYER, OUTPUT_NONFINITE

__all__ = ["NonFinite"]


class NonFinite(Detector):
    """NaN or Inf appeared in the loss, the gradients, the parameters or a module's output.

    **Symptom.** The loss or the gradient norm reads ``nan``/``inf``; once a NaN reaches the weights,
    every later step is NaN too.

    **Why it matters.** A single non-finite update destroys the weights it touches: training is over
    from that step unless the step was skipped (as ``torch.amp.GradScaler`` does with overflowing
    half-precision gradients).

    **Rule.** Finds the first step where the loss, the global gradient norm, a layer's gradients, a
    parameter norm (Inf) or a watched module's output went non-finite (a module non-finite from the
    first step on while loss and gradients are finite, like attention scores masked with -inf, is by
    design and ignored), and the first module *in forward
    order* whose output was non-finite at that step — ``(input)`` when the input batch itself carried it.
    The cause is read from that step: non-finite input → the data; a non-finite loss from finite model
    outputs → the loss code; a loss or gradient that grew by ≥ ``growth_decades`` decades (or an update of
    ≥ 30% of the weights' norm in the first steps) within the ``lookback`` steps before → divergence.
    Severity: ``error`` when the run ends non-finite (loss or outputs at the last step, or
    ≥ ``persistent_skips`` consecutive steps of non-finite gradients); ``warning`` when the input batch
    carried NaN/Inf, when non-finite steps recurred, or when more than ``max_skipped_fraction`` of the
    steps after the first ones had to be skipped; ``info`` for a few isolated steps the run recovered from
    (a GradScaler skipping an overflow is healthy).

    **Fixes.** Data with NaN → validate and clean the batches; unstable loss → numerically stable forms
    (``F.cross_entropy`` on logits, ``binary_cross_entropy_with_logits``, clamped ``log``); divergence →
    a lower learning rate with a proposed value, gradient clipping at the healthy gradient norm
    (first for recurrent networks); a module producing NaN from finite input → its numerics.
    """

    code = "nonfinite"

    @dataclass(frozen=True)
    class Config:
        max_skipped_fraction: float = 0.05  # GradScaler skips ~1 step per growth_interval (2000) once calibrated; > 5% skipped loses a real share of the updates
        persistent_skips: int = 64  # GradScaler calibrates from its default 2**16 in ≤ 16-24 halvings; 64 consecutive skips means its scale collapsed
        lookback: int = 10  # steps searched for a blow-up before the first NaN: lr 10-100× too high takes 2-10 steps from healthy to Inf
        growth_decades: float = 1.0  # a loss or gradient 10× above its earlier level diverged into the NaN (healthy runs measured ≤ 0.9 decades in 10 steps)

    def check(self, run: Run) -> Iterator[Finding]:
        cfg = self.config
        n = run.n_steps
        if n == 0:
            return
        lv = loss_view(run)
        loss = lv.raw
        loss_bad = ~np.isfinite(loss) & lv.given if lv.recorded else np.zeros(n, dtype=bool)
        grad = np.asarray(run.grad_norm, dtype=np.float64)
        grad_bad = ~np.isfinite(grad) & _present(run, "global_grad_norm", n)
        # The per-layer flags are read as the stored float32 arrays: a long run's float64 frames of
        # them would be the largest allocation of the whole diagnosis. (NaN, not recorded, is not > 0.)
        if "grad_nonfinite" in run.metrics:
            grad_bad |= (run.metric_array("grad_nonfinite")[0] > 0).any(axis=1)
        weight_bad: np.ndarray = np.zeros(n, dtype=bool)
        if "weight_norm" in run.metrics:
            # NaN there also means "not measured" (a skipped optimizer step); only Inf is certain.
            weight_bad = np.isinf(run.metric_array("weight_norm")[0]).any(axis=1)
        f = A.facts(run)
        outputs_bad, cols = _outputs_bad(run, f.order)
        input_col = run.input_layer
        out_bad = outputs_bad
        if out_bad.size and not loss_bad[0] and not grad_bad[0]:
            # A module whose output holds ±Inf from the first step on while the loss and the gradients
            # are finite does it by design (attention scores masked with -inf): not a failure.
            by_design = out_bad[0] & (out_bad.mean(axis=0) >= 0.95)
            out_bad = out_bad & ~by_design
        any_out_bad = np.asarray(out_bad.any(axis=1) if out_bad.size else np.zeros(n), dtype=bool)
        bad = loss_bad | grad_bad | weight_bad | any_out_bad
        if not bad.any():
            return
        i0 = int(np.argmax(bad))
        s0 = step_at(run, i0)

        # --- where it began
        first_modules = [cols[j] for j in np.flatnonzero(out_bad[i0])] if out_bad.size else []
        input_first = input_col in first_modules
        module_first = [m for m in first_modules if m != input_col]
        grad_layers = _grad_bad_layers(run, i0)
        hard = loss_bad | any_out_bad | weight_bad  # beyond a skipped gradient
        skipped_only = grad_bad & ~hard

        # --- how bad it is now
        runs = F.runs_of_true(bad)
        end_run = runs[-1][1] if runs and runs[-1][0] + runs[-1][1] == n else 0
        ends_hard = bool(end_run and (loss_bad[-1] or any_out_bad[-1] or weight_bad[-1]))
        skip_runs = F.runs_of_true(skipped_only)
        leading = skip_runs[0][1] if skip_runs and skip_runs[0][0] == 0 else 0
        longest_skip = max((length for _, length in skip_runs), default=0)
        skipped_after_start = int(skipped_only[leading:].sum())
        skipped_fraction = skipped_after_start / max(n - leading, 1)
        hard_events = len(F.runs_of_true(hard))
        input_bad_rows = outputs_bad[:, cols.index(input_col)] if input_col in cols else np.zeros(n, dtype=bool)

        if ends_hard or (end_run >= cfg.persistent_skips):
            severity = Severity.ERROR
        elif input_bad_rows.any() or hard_events >= 2 or skipped_fraction > cfg.max_skipped_fraction or longest_skip >= cfg.persistent_skips:
            severity = Severity.WARNING
        else:
            severity = Severity.INFO

        # --- why
        grew, growth = self._diverged_before(run, i0, lv.values, grad)
        cause: str
        if input_first or bool(input_bad_rows[i0]):
            cause = "data"
            layers = [input_col, *module_first]
        elif grew:
            cause = "divergence"
            layers = module_first or grad_layers
        elif loss_bad[i0] and not module_first:
            cause = "loss"
            layers = grad_layers
        elif module_first:
            cause = "module"
            layers = module_first
        elif grad_bad[i0] and not hard[i0]:
            cause = "skipped"
            layers = grad_layers
        else:
            cause = "optimizer"
            layers = [layer for layer in run.layers if layer in set(grad_layers)] or list(run.layers)

        last_bad = int(np.flatnonzero(bad)[-1])
        evidence = {
            "first_step": float(s0 if s0 is not None else i0),
            "nonfinite_steps": int(bad.sum()),
            "loss_nonfinite_steps": int(loss_bad.sum()),
            "grad_nonfinite_steps": int(grad_bad.sum()),
            "output_nonfinite_steps": int(any_out_bad.sum()),
            "input_nonfinite_steps": int(input_bad_rows.sum()),
            "skipped_fraction": float(skipped_fraction),
            "recovered": 0 if end_run else 1,
            "growth_decades_before": float(growth),
        }
        message = self._message(cause, s0, layers, f, end_run == 0, int(bad.sum()), _finite_outputs(run, i0))
        rank = _first_nonfinite_rank(run, i0)
        if rank is not None:
            # Under torch.distributed the run records, per step, the lowest rank whose own loss or
            # forward outputs went non-finite (the all-reduce then spreads it to every rank).
            evidence["rank"] = rank
            message += f" (first on rank {rank})"
        fixes = self._fixes(cause, f, s0, i0, layers)
        yield Finding(
            code=self.code,
            severity=severity,
            step=s0,
            last_step=step_at(run, last_bad),
            layers=tuple(layers[:12]),
            message=message,
            evidence=evidence,
            fixes=fixes,
        )

    # ------------------------------------------------------------------ helpers

    def _diverged_before(self, run: Run, i0: int, loss_t: np.ndarray, grad: np.ndarray) -> tuple[bool, float]:
        """Did the loss or the gradient blow up in the steps before row ``i0``? (and by how many decades)"""
        cfg = self.config
        lo = max(0, i0 - cfg.lookback)
        growth = 0.0
        for series, is_log in ((loss_t, loss_view(run).is_log), (F.log10_positive(grad), True)):
            if not is_log:
                continue
            before, window = series[:lo], series[lo : i0 + 1]
            window = window[np.isfinite(window)]
            if not window.size:
                continue
            reference = F.nan_median(before) if np.isfinite(before).sum() >= 3 else F.nan_median(series[: min(3, i0 + 1)])
            if np.isfinite(reference):
                growth = max(growth, float(window.max() - reference))
        if growth >= cfg.growth_decades:
            return True, growth
        # No history (the first steps): an update that moved weights by ≥ 30% of their norm blew them up.
        if i0 < 5:
            ur = A.facts(run).update_ratio(slice(0, i0))
            if not ur.empty and i0 > 0:
                prior = ur.to_numpy(dtype=np.float64)
                prior = prior[np.isfinite(prior)]
                if prior.size and prior.max() >= A.HIGH_UPDATE_RATIO:
                    return True, growth
        return False, growth

    def _message(
        self, cause: str, step: int | None, layers: list[str], f: A.RunFacts, recovered: bool, count: int, finite_outputs: str | None
    ) -> str:
        where = f"step {step}"
        first = layers[0] if layers else None
        kind = f.types.get(first or "", "")
        tail = (
            f"; the run recovered ({count} step{'s' if count != 1 else ''} affected)"
            if recovered
            else f"; every step since is non-finite ({count} steps)"
            if count > 1
            else ""
        )
        if cause == "data":
            return f"the input batch at {where} held NaN/Inf before any layer ran{tail}"
        if cause == "divergence":
            what = (
                "the model's output"
                if first == OUTPUT_LAYER
                else f"`{first}` ({kind}) output"
                if first and kind
                else f"`{first}` output"
                if first
                else "the gradients"
            )
            return f"the run diverged into NaN/Inf at {where}: {what} went non-finite after the loss/gradients grew{tail}"
        if cause == "loss" and finite_outputs is None:
            return f"the loss became NaN/Inf at {where}, where no model or module output was checked: the loss computation is the likely cause{tail}"
        if cause == "loss":
            return f"the loss became NaN/Inf at {where} while {finite_outputs}: the loss computation itself is unstable{tail}"
        if cause == "module" and first == OUTPUT_LAYER:
            return (
                f"the model's output went NaN/Inf at {where} from a finite input batch; modules are checked on sampled "
                f"steps only, so pass `check_outputs=True` to gradscope.Monitor to name the module that produced it{tail}"
            )
        if cause == "module":
            return f"`{first}` ({kind}) was the first module, in forward order, to output NaN/Inf at {where}{tail}"
        if cause == "skipped":
            names = ", ".join(f"`{layer}`" for layer in layers[:3])
            return f"gradients went non-finite at {where} ({names}) with a finite loss and outputs{tail}"
        return f"parameters went non-finite at {where} while gradients were finite: the optimizer update produced them{tail}"

    def _fixes(self, cause: str, f: A.RunFacts, step: int | None, i0: int, layers: list[str]) -> tuple[Fix, ...]:
        clip = A.clip_fix(f, before=i0)
        check = Fix(
            FixKind.CODE,
            "Stop at the first bad step to see it happen: `torch.autograd.set_detect_anomaly(True)` for one run, "
            "or `gradscope.Monitor(..., on_finding='raise')`.",
        )
        if cause == "data":
            return A.ranked_fixes(
                [
                    Fix(
                        FixKind.DATA,
                        f"The batch at step {step} already contained NaN/Inf: check the dataset for missing values and "
                        "divisions by zero in preprocessing, e.g. `assert torch.isfinite(x).all()` in the data loader, "
                        "and drop or impute the bad samples.",
                    ),
                    Fix(
                        FixKind.CODE,
                        "Guard the training step: skip the update when `not torch.isfinite(loss)`, so one bad batch cannot poison the weights.",
                    ),
                ]
            )
        if cause == "divergence":
            causes = A.likely_causes(f, step=step, diverged=True, explosion_before=i0)
            return A.ranked_fixes([c.fix for c in causes], [clip, check])
        if cause == "loss":
            return A.ranked_fixes(
                [
                    Fix(
                        FixKind.CODE,
                        "The loss turned NaN/Inf from finite model outputs: use numerically stable forms — "
                        "`F.cross_entropy(logits, y)` instead of `log(softmax(...))`, `F.log_softmax`, "
                        "`F.binary_cross_entropy_with_logits` instead of sigmoid + BCE, `torch.log(p.clamp_min(1e-12))`, "
                        "and an epsilon in every division and sqrt.",
                    ),
                    A.lower_lr_fix(f, step, what="made the outputs extreme enough to break the loss"),
                    clip,
                ]
            )
        if cause == "module":
            first = layers[0] if layers else "?"
            culprit = (
                "A module of the model (rerun with `gradscope.Monitor(..., check_outputs=True)` to name it)"
                if first == OUTPUT_LAYER
                else f"`{first}` ({f.types.get(first, '?')})"
            )
            return A.ranked_fixes(
                [
                    Fix(
                        FixKind.CODE,
                        f"{culprit} produced NaN/Inf from finite inputs at step {step}: check "
                        "its numerics (log/sqrt/pow of values ≤ 0, division by a norm or a variance that can be 0, "
                        "exp overflow) and add clamping or an epsilon.",
                    ),
                    A.lower_lr_fix(f, step, what="produced non-finite values"),
                    clip,
                    check,
                ]
            )
        if cause == "skipped":
            return A.ranked_fixes(
                [
                    Fix(
                        FixKind.CODE,
                        "Only the gradients were non-finite: with mixed precision, this is GradScaler skipping an "
                        "overflow (harmless when rare); otherwise look for an operation with an infinite derivative "
                        "at the current values in backward (sqrt or pow at 0, acos at ±1, norm of a zero vector).",
                    ),
                    clip,
                    check,
                ]
            )
        return A.ranked_fixes(
            [
                Fix(
                    FixKind.OPTIMIZER,
                    f"{f.optimizer_class} produced non-finite parameters from finite gradients: check its "
                    "hyperparameters (eps > 0, a finite learning rate, no division by a zero state).",
                ),
                check,
            ]
        )


def _present(run: Run, metric: str, n: int) -> np.ndarray:
    """Rows where a run-level series was recorded at all (all False when the run does not hold it)."""
    return np.full(n, metric in run.metrics, dtype=bool)


def _outputs_bad(run: Run, order: list[str]) -> tuple[np.ndarray, list[str]]:
    """steps × modules, True where the module's output held NaN/Inf, and the modules: in forward
    order, input first."""
    if OUTPUT_NONFINITE not in run.metrics:
        return np.zeros((run.n_steps, 0), dtype=bool), []
    values, names = run.metric_array(OUTPUT_NONFINITE)
    columns = [run.input_layer] if run.input_layer in names else []
    columns += [m for m in order if m in names and m != run.input_layer]
    columns += [c for c in names if c not in set(columns)]
    position = {name: i for i, name in enumerate(names)}
    return (values > 0)[:, [position[c] for c in columns]], columns


def _finite_outputs(run: Run, row: int) -> str | None:
    """What was checked, and found finite, among the model's and modules' outputs at ``row``, as a
    message says it; None when none was. (Modules are checked on sampled steps only, and an output
    gradscope finds no tensor in is never checked: a message must not claim more.)"""
    if OUTPUT_NONFINITE not in run.metrics or row >= run.n_steps:
        return None
    values, names = run.metric_array(OUTPUT_NONFINITE)
    outputs = {name: value for name, value in zip(names, values[row], strict=True) if name != run.input_layer}
    finite = {name for name, value in outputs.items() if value == 0}  # NaN: not checked; 1: Inf by design (masks)
    if outputs and len(finite) == len(outputs):
        return "every module output was finite"
    if OUTPUT_LAYER in finite:
        return "the model's output was finite"
    if finite and not any(value > 0 for value in outputs.values()):
        return "every module output checked there was finite (the model's output was not checked)"
    return None


def _grad_bad_layers(run: Run, row: int) -> list[str]:
    """Layers with a non-finite gradient at ``row``, output side first (backward reaches it first)."""
    if "grad_nonfinite" not in run.metrics or row >= run.n_steps:
        return []
    values, names = run.metric_array("grad_nonfinite")
    bad = [c for c, v in zip(names, values[row], strict=True) if np.isfinite(v) and v > 0]
    order = {layer: i for i, layer in enumerate(run.layers)}
    return sorted(bad, key=lambda layer: -order.get(layer, -1))


def _first_nonfinite_rank(run: Run, i0: int) -> int | None:
    if "nonfinite_rank" not in run.metrics:
        return None
    ranks = run.scalar("nonfinite_rank")
    seen = ranks[i0:][np.isfinite(ranks[i0:])]
    return int(seen[0]) if seen.size else None
