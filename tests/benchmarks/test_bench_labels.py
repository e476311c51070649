"""Every scenario's label, measured with plain torch instead of assumed.

Each scenario runs here without gradscope (``log_dir=None``): the numbers come from the training
loop's own losses, from ``param.grad`` read right after backward, and from forward passes through the
trained model. Healthy scenarios must really train (low loss, accuracy far above chance); a fault
scenario must really show its symptom, and the same scenario with the fault turned back (its
counterfactual knob) must train well, which shows that the injected change is the fault and that the
labelled first fix is one that works.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.scenarios import ScenarioRun, all_scenarios, get_scenario
from benchmarks.scenarios.core import digits_split

LN10 = math.log(10)

# ---------------------------------------------------------------------------- measurements


@functools.cache
def _run_cached(name: str, seed: int, knobs: tuple[tuple[str, Any], ...]) -> ScenarioRun:
    return get_scenario(name).run(seed, **dict(knobs))


class Runner:
    """Runs one scenario on one seed, plain torch, cached per set of knobs."""

    def __init__(self, name: str, seed: int) -> None:
        self.name, self.seed = name, seed

    def __call__(self, **knobs: Any) -> ScenarioRun:
        return _run_cached(self.name, self.seed, tuple(sorted(knobs.items())))


def score(run: ScenarioRun) -> float:
    """Held-out accuracy (classification) or R² (regression) of the trained model."""
    assert run.eval is not None, f"{run.name} sets no eval set"
    model = run.model.eval()
    with torch.no_grad():
        out = model(run.eval.x)
    if run.eval.kind == "classification":
        return float((out.argmax(dim=1) == run.eval.y).float().mean())
    if run.eval.kind == "binary":
        return float(((out[:, 0] > 0).float() == run.eval.y).float().mean())
    return float(1 - F.mse_loss(out, run.eval.y) / run.eval.y.var())


def head(run: ScenarioRun, n: int = 10) -> float:
    return float(np.mean(run.probe.losses[:n]))


def tail(run: ScenarioRun, n: int = 20) -> float:
    return float(np.mean(run.probe.losses[-n:]))


def all_finite(run: ScenarioRun) -> bool:
    return bool(np.isfinite(run.probe.loss_array()).all())


def grad_ratio(run: ScenarioRun, first: str, last: str, steps: slice = slice(None)) -> float:
    """Median over the sampled steps of ‖grad(first)‖ / ‖grad(last)‖."""
    _, a = run.probe.grad_series(first)
    _, b = run.probe.grad_series(last)
    return float(np.median((a / b)[steps]))


def outputs_of(model: nn.Module, kind: type[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every ``kind`` module on input ``x``, captured with forward hooks."""
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: captured.append(out.detach())) for m in model.modules() if isinstance(m, kind)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return captured


def dead_fraction(out: torch.Tensor) -> float:
    """Fraction of units (columns) that are zero for every sample."""
    return float((out.amax(dim=0) <= 0).float().mean())


def swings(losses: list[float], window: int = 10, span: int = 50) -> tuple[float, int]:
    """(median peak-to-trough range over ``span``-step windows, number of trend reversals) of the
    ``window``-step mean loss over the second half of training."""
    half = np.asarray(losses[len(losses) // 2 :])
    smooth = np.convolve(half, np.ones(window) / window, mode="valid")
    ranges = [np.ptp(smooth[i : i + span]) for i in range(0, len(smooth) - span, span // 2)]
    direction = np.sign(np.diff(smooth[::window]))
    return float(np.median(ranges)), int((direction[1:] * direction[:-1] < 0).sum())


# ---------------------------------------------------------------------------- healthy scenarios


def healthy(min_score: float, max_loss_fraction: float = 0.2) -> Callable[[Runner], ScenarioRun]:
    """A check that the run trains: finite losses, a final loss well under the initial one, a good score."""

    def check(runner: Runner) -> ScenarioRun:
        run = runner()
        assert all_finite(run)
        assert tail(run) < max_loss_fraction * head(run), (head(run), tail(run))
        assert score(run) >= min_score, score(run)
        return run

    return check


def check_converged_flat(runner: Runner) -> None:
    run = healthy(0.99, 0.05)(runner)
    losses = run.probe.loss_array()
    # Converged early: by step 100 the loss is already within a small distance of its final level,
    # and the remaining 300 steps are flat near zero.
    assert losses[100:150].mean() < 0.05 * losses[:5].mean()
    assert losses[100:].max() < 0.05


def check_warmup_cosine(runner: Runner) -> None:
    run = healthy(0.95)(runner)
    lrs = np.asarray(run.probe.lrs)
    peak = lrs.max()
    assert lrs[0] <= peak / 10 and int(lrs.argmax()) in range(35, 45)  # linear warmup over 40 steps
    assert lrs[-1] < 0.01 * peak  # cosine decay to ~0


def check_step_decay(runner: Runner) -> None:
    run = healthy(0.95)(runner)
    lrs = np.asarray(run.probe.lrs)
    assert np.allclose(lrs[[0, 149, 150, 299, 300, 449]], [0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005])


def check_dropout(runner: Runner) -> None:
    run = healthy(0.93, 0.25)(runner)
    x, y, _, _ = digits_split()
    # Dropout is active while training: the recorded training loss sits above the loss of the
    # same model evaluated without dropout.
    with torch.no_grad():
        eval_loss = float(F.cross_entropy(run.model.eval()(x), y))
    assert tail(run, 50) > 1.5 * eval_loss


def check_frozen(runner: Runner) -> None:
    run = healthy(0.75, 0.3)(runner)
    frozen = [n for n, p in run.model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("0.") for n in frozen)  # the whole body, nothing else
    assert all(p.grad is None for p in run.model.parameters() if not p.requires_grad)
    assert set(run.probe.param_names) == {"1.weight", "1.bias"}


def check_grad_accumulation(runner: Runner) -> None:
    run = healthy(0.9)(runner)
    assert run.probe.n_steps == 200  # optimizer steps, each over 4 micro-batches


def check_transformer_warmup(runner: Runner) -> None:
    run = healthy(0.95)(runner)
    lrs = np.asarray(run.probe.lrs)
    assert lrs[0] < lrs.max() / 10 and int(lrs.argmax()) in range(45, 55)


def check_deep_residual(runner: Runner) -> None:
    run = healthy(0.9)(runner)
    assert sum(isinstance(m, nn.Linear) for m in run.model.modules()) >= 34
    assert sum(isinstance(m, nn.LayerNorm) for m in run.model.modules()) >= 16


def check_resnet_bn(runner: Runner) -> None:
    run = healthy(0.85)(runner)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in run.model.modules()) >= 13


def check_amp(runner: Runner) -> None:
    run = healthy(0.9)(runner)
    skipped = run.measured["skipped_steps"]
    # The scaler skipped some steps (inf gradients) but only occasionally: the AMP pattern, not a fault.
    assert 1 <= skipped <= 0.05 * run.probe.n_steps  # (the loss itself stays finite: checked by healthy())


# ---------------------------------------------------------------------------- fault scenarios


def check_lr_too_high_sgd(runner: Runner) -> None:
    run = runner()
    losses = run.probe.loss_array()
    assert run.probe.first_nonfinite_loss() is not None or np.nanmax(losses) > 100 * head(run, 1)
    assert score(run) < 0.3
    assert score(runner(lr=0.1)) > 0.9


def check_lr_too_high_adam(runner: Runner) -> None:
    run = runner()
    assert np.nanmax(run.probe.loss_array()[:20]) > 100 * head(run, 1)  # the loss blows up at once
    x, _, _, _ = digits_split()
    relu_outputs = outputs_of(run.model, nn.ReLU, x)
    assert max(dead_fraction(o) for o in relu_outputs) > 0.9  # then a hidden layer is all but dead
    assert score(run) < 0.2
    assert score(runner(lr=1e-3)) > 0.9


def check_lr_too_low(runner: Runner) -> None:
    run = runner()
    assert tail(run) > 0.97 * head(run)  # the loss barely moves in 400 steps
    assert abs(head(run) - LN10) < 0.1  # and stays at chance level
    assert score(runner(lr=0.1)) > 0.9


def check_deep_sigmoid(runner: Runner) -> None:
    run = runner()
    # The first layer's gradient is over 3 orders of magnitude below the last layer's, all along.
    assert grad_ratio(run, "0.weight", "20.weight") < 1e-3
    assert tail(run) > 0.95 * LN10
    assert score(runner(act=nn.GELU)) > 0.85  # the same net with GELU trains


def check_deep_tanh_saturated(runner: Runner) -> None:
    run = runner()
    x, _, _, _ = digits_split()
    saturated = [float((o.abs() > 0.99).float().mean()) for o in outputs_of(run.model, nn.Tanh, x)]
    assert np.mean(saturated) > 0.8, saturated  # the units sit at ±1
    init = runner(steps=0).model  # the model as initialised
    saturated0 = [float((o.abs() > 0.99).float().mean()) for o in outputs_of(init, nn.Tanh, x)]
    assert np.mean(saturated0) > 0.5, saturated0  # ... from the start
    assert grad_ratio(run, "0.weight", "20.weight", slice(-10, None)) < 1e-3
    assert tail(run) > 0.95 * LN10
    assert score(runner(std=None)) > 0.85  # Xavier init (tanh gain) trains


def check_init_too_small(runner: Runner) -> None:
    run = runner()
    first = run.probe.grad_norms[0]
    # Every weight's gradient is near zero from step 0 (only the output bias learns the class priors).
    assert max(v for k, v in first.items() if k.endswith("weight") and v is not None) < 1e-3
    fixed = runner(std=None)
    assert min(v for k, v in fixed.probe.grad_norms[0].items() if k.endswith("weight") and v is not None) > 1e-2
    assert tail(run) > 0.97 * LN10
    assert score(fixed) > 0.9


def check_init_too_large(runner: Runner) -> None:
    run = runner()
    assert head(run, 1) > 100 * LN10  # the very first loss is already enormous
    assert run.probe.first_nonfinite_loss() is not None  # and training ends in NaN
    assert score(runner(std=None)) > 0.85  # He init trains


def check_dying_relu(runner: Runner) -> None:
    run = runner()
    x, _, _, _ = digits_split()
    first_relu = outputs_of(run.model, nn.ReLU, x)[0]
    assert dead_fraction(first_relu) > 0.5  # most first-layer units never fire on any training digit
    init_relu = outputs_of(runner(steps=0).model, nn.ReLU, x)[0]
    assert dead_fraction(init_relu) > 0.5  # ... and were dead from the start
    assert score(run) < 0.6 and tail(run) > 1.0  # the outcome suffers
    assert score(runner(bias=None)) > 0.9  # default biases train
    assert score(runner(act=nn.ELU)) > 0.85  # so does an activation that passes gradient below zero


def check_unnormalised_inputs(runner: Runner) -> None:
    run = runner()
    first_layer = runner(steps=0).model.get_submodule("0")  # as initialised
    x, _, _, _ = digits_split(normalize=False)
    with torch.no_grad():
        pre = first_layer(x * 255)
    assert float(pre.std()) > 50  # first-layer pre-activations are huge (vs ~1 for standardised input)
    assert np.nanmax(run.probe.loss_array()) > 100 * LN10 or run.probe.first_nonfinite_loss() is not None
    assert score(run) < 0.3
    assert score(runner(scale=0)) > 0.9  # standardised inputs train


def check_nan_in_batch(runner: Runner) -> None:
    run = runner()
    assert run.label.onset == 150
    assert run.probe.first_nonfinite_loss() == 150
    assert np.isfinite(run.probe.loss_array()[:150]).all()
    clean = runner(nan_step=None)
    assert all_finite(clean) and score(clean) > 0.9


def check_unstable_loss(runner: Runner) -> None:
    run = runner()
    onset = run.probe.first_nonfinite_loss()
    assert onset is not None and onset > 20 and run.label.onset == onset
    # The loss went NaN where the stable formula of the same logits is finite: the code is at fault.
    assert math.isfinite(run.measured["stable_loss_at_onset"])
    stable = runner(stable=True)
    assert all_finite(stable) and score(stable) > 0.9


def check_exploding_rnn(runner: Runner) -> None:
    run = runner()
    _, norms = run.probe.grad_series("rnn.weight_hh_l0")
    assert norms[0] > 100  # the gradient through 60 steps is already huge at step 0
    onset = run.probe.first_nonfinite_loss()
    assert onset is not None and onset < 10
    assert runner(lr=1e-3).probe.first_nonfinite_loss() is not None  # a lower lr does not save it
    clipped = runner(clip=1.0)
    assert all_finite(clipped) and score(clipped) > 0.5  # clipping does (chance: 0.25)


def check_transformer_no_warmup(runner: Runner) -> None:
    run = runner()
    with_schedule = runner(warmup_cosine=True)
    lower_lr = runner(lr=3e-3)
    assert score(with_schedule) > 0.95 and score(lower_lr) > 0.95
    # Without warmup the loss stays far above where the scheduled run ends, and stops improving.
    assert tail(run, 50) > 0.25 and tail(run, 50) > 5 * tail(with_schedule, 50)
    assert tail(run, 50) > 0.5 * float(np.mean(run.probe.losses[100:150]))
    assert score(run) < 0.9


def check_momentum_oscillation(runner: Runner) -> None:
    run = runner()
    calm = runner(momentum=0.9)
    amplitude, reversals = swings(run.probe.losses)
    calm_amplitude, _ = swings(calm.probe.losses)
    # The 10-step mean loss keeps swinging up and down in the second half, by far more than the
    # momentum-0.9 run, and the swings grow: the late loss sits well above the best it reached.
    assert amplitude > 0.3 and amplitude > 10 * calm_amplitude, (amplitude, calm_amplitude)
    assert reversals >= 6
    smooth = np.convolve(run.probe.loss_array(), np.ones(10) / 10, mode="valid")
    assert smooth[-50:].mean() > 3 * smooth.min()
    assert score(calm) > 0.95
    assert score(runner(lr=0.003)) > 0.9


def check_detached_branch(runner: Runner) -> None:
    run = runner()
    for step, grads in run.probe.grad_norms.items():
        aux = {k: v for k, v in grads.items() if k.startswith("aux.")}
        rest = {k: v for k, v in grads.items() if not k.startswith("aux.")}
        assert aux and all(v is None for v in aux.values()), step
        assert all(v is not None and v > 0 for v in rest.values()), step
    assert all(p.grad is None for n, p in run.model.named_parameters() if n.startswith("aux."))
    attached = runner(detach_aux=False)
    assert all(v is not None for v in attached.probe.grad_norms[0].values())


def check_cnn_lr_too_high(runner: Runner) -> None:
    run = runner()
    onset = run.probe.first_nonfinite_loss()
    assert onset is not None and onset < 20  # diverges to NaN within a few steps
    assert np.nanmax(run.probe.loss_array()) > 100 * LN10
    assert score(runner(lr=0.05)) > 0.95


def check_lstm_lr_too_low(runner: Runner) -> None:
    run = runner()
    assert tail(run) > 0.97 * head(run) and abs(tail(run) - math.log(4)) < 0.05  # stuck at chance
    assert score(runner(lr=1e-2)) > 0.8


def check_no_zero_grad(runner: Runner) -> None:
    run = runner()
    _, norms = run.probe.grad_series("0.weight")
    # .grad holds the running sum: its norm climbs far above a single batch's, and the run fails
    fixed = runner(zero_grad=True)
    _, fixed_norms = fixed.probe.grad_series("0.weight")
    assert norms[-1] > 10 * float(np.nanmax(fixed_norms)), (norms[-1], np.nanmax(fixed_norms))
    assert score(run) < 0.5 or not all_finite(run)
    assert score(fixed) > 0.9


def check_sorted_by_class(runner: Runner, batch_size: int = 16, epochs: int = 3) -> None:
    run = runner()
    fixed = runner(shuffle=True)
    _, y, _, _ = digits_split()
    per_epoch = math.ceil(len(y) / batch_size)
    assert run.probe.n_steps == fixed.probe.n_steps == epochs * per_epoch
    # Class k starts at example starts[k] of the sorted data; batch ceil(starts[k] / 16) is the first one
    # made only of class k, two batches earlier only the class before it (or class 9 of the last epoch).
    starts = np.r_[0, np.cumsum(np.bincount(y.numpy(), minlength=10))[:-1]]
    first = -(-starts // batch_size)
    at = np.asarray([e * per_epoch + b for e in range(epochs) for b in first if e * per_epoch + b >= 2])

    def jumps(r: ScenarioRun) -> np.ndarray:
        losses = r.probe.loss_array()
        return np.log10(losses[at] / losses[at - 2])

    # Every class boundary lifts the loss by more than a decade; shuffled, the same steps show no jump.
    assert np.median(jumps(run)) > 1.0 and (jumps(run) > 0.5).mean() > 0.9, jumps(run)
    assert abs(np.median(jumps(fixed))) < 0.3, jumps(fixed)
    # The model ends up predicting the last class it was fed, and fails on the balanced test set.
    assert run.eval is not None
    with torch.no_grad():
        predicted = run.model(run.eval.x).argmax(dim=1)
    assert int(predicted.mode().values) == 9 and float((predicted == 9).float().mean()) > 0.4
    assert score(run) < 0.5
    assert score(fixed) > 0.9


CHECKS: dict[str, Callable[[Runner], Any]] = {
    "mlp_digits": healthy(0.9),
    "cnn_digits": healthy(0.9),
    "noisy_small_batch": healthy(0.8),
    "converged_flat": check_converged_flat,
    "warmup_cosine": check_warmup_cosine,
    "step_decay": check_step_decay,
    "grad_accumulation": check_grad_accumulation,
    "dropout_mlp": check_dropout,
    "frozen_body_finetune": check_frozen,
    "lstm_sequence": healthy(0.8),
    "transformer_warmup": check_transformer_warmup,
    "deep_residual_layernorm": check_deep_residual,
    "deep_resnet_batchnorm": check_resnet_bn,
    "regression_synthetic": healthy(0.9, 0.4),
    "adam_mlp_28px": healthy(0.9),
    "amp_gradscaler": check_amp,
    "lr_too_high_sgd": check_lr_too_high_sgd,
    "lr_too_high_adam": check_lr_too_high_adam,
    "lr_too_low": check_lr_too_low,
    "deep_sigmoid": check_deep_sigmoid,
    "deep_tanh_saturated": check_deep_tanh_saturated,
    "init_too_small": check_init_too_small,
    "init_too_large": check_init_too_large,
    "dying_relu": check_dying_relu,
    "unnormalised_inputs": check_unnormalised_inputs,
    "nan_in_batch": check_nan_in_batch,
    "unstable_loss": check_unstable_loss,
    "exploding_rnn": check_exploding_rnn,
    "transformer_no_warmup": check_transformer_no_warmup,
    "momentum_oscillation": check_momentum_oscillation,
    "detached_branch": check_detached_branch,
    "cnn_lr_too_high": check_cnn_lr_too_high,
    "lstm_lr_too_low": check_lstm_lr_too_low,
    "no_zero_grad": check_no_zero_grad,
    "sorted_by_class": check_sorted_by_class,
}

# Fast scenarios whose checks train several counterfactual variants, a few seconds in all.
_EXPENSIVE = {"exploding_rnn", "momentum_oscillation"}


def _cases() -> list[Any]:
    cases = []
    for s in all_scenarios():
        for seed in (0, 1):
            slow = not s.fast or seed != 0 or s.name in _EXPENSIVE
            cases.append(pytest.param(s.name, seed, id=f"{s.name}-s{seed}", marks=[pytest.mark.slow] if slow else []))
    return cases


def test_every_scenario_has_a_label_check() -> None:
    assert set(CHECKS) == {s.name for s in all_scenarios()}


def test_the_suite_is_large_enough_and_covers_every_code() -> None:
    scenarios = all_scenarios()
    assert len(scenarios) >= 30
    assert sum(s.healthy for s in scenarios) >= 12
    codes = {c for s in scenarios for c in s.label.codes}
    required = {
        "nonfinite", "exploding_loss", "exploding_gradients", "vanishing_gradients", "stalled_training",
        "dead_units", "saturated_activations", "oscillating_loss", "no_gradient",
    }
    assert required <= codes


@pytest.mark.parametrize(("name", "seed"), _cases())
def test_label_holds(name: str, seed: int) -> None:
    CHECKS[name](Runner(name, seed))
