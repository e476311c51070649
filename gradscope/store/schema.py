"""Names shared by the writer (the Monitor) and the readers of a run: streams, pseudo-layers, metrics."""

from __future__ import annotations

__all__ = [
    "ACTIVATION_METRICS",
    "FORWARD_STREAM",
    "INPUT_LAYER",
    "LAYER_METRICS",
    "OUTPUT_LAYER",
    "PARAM_METRICS",
    "RUN_LAYER",
    "STEP_STREAM",
]

STEP_STREAM = "step"  # one row per optimizer step
FORWARD_STREAM = "forward"  # one row per step on which activations were sampled

RUN_LAYER = "(run)"  # run-level series: loss, global grad norm, learning rates
INPUT_LAYER = "(input)"  # the batch given to the model's forward
OUTPUT_LAYER = "(output)"  # what the model's forward returned

LAYER_METRICS = (
    "grad_norm",  # L2 norm of the gradients of the parameters a module owns directly
    "weight_norm",  # L2 norm of those parameters
    "update_norm",  # ‖Δθ‖ of those parameters over the optimizer step
    "grad_nonfinite",  # parameters whose gradient holds NaN/Inf
    "grad_missing",  # parameters that require grad but received none (grad is None)
)
PARAM_METRICS = ("param_grad_norm", "param_weight_norm", "param_update_norm", "param_grad_missing")
# 1 when a module's output held NaN/Inf: every step for the input batch and the model's output, and
# for each watched module on sampled steps (every step with check_outputs=True); NaN when not checked
OUTPUT_NONFINITE = "output_nonfinite"
ACTIVATION_METRICS = (
    "act_mean",
    "act_std",
    "act_zero_frac",  # fraction of exact zeros
    "act_dead_frac",  # fraction of units that were zero for the whole batch
    "act_saturated_frac",  # bounded activations only: fraction within a tolerance of the bounds
    "act_max_abs",
    "act_nonfinite",  # 1 when the output held NaN/Inf (min or max non-finite), else 0
)
