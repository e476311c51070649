"""Synthetic runs for detector tests: healthy curves of many kinds and one injected fault each.

Every builder is deterministic (its own seeded generator) and returns a :class:`gradscope.Run` made by
:func:`gradscope.testing.synthetic_run`, shaped like what the Monitor records for a small MLP:
``fc0 → act0 → fc1 → act1 → … → head``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradscope.store.run import Run
from gradscope.testing import synthetic_run

__all__ = ["FAULTY", "HEALTHY", "mlp_run"]


def _noisy(curve: np.ndarray, decades: float, seed: int) -> np.ndarray:
    """A loss curve with multiplicative minibatch noise of ``decades`` (log10 std)."""
    rng = np.random.default_rng(seed)
    return curve * 10 ** rng.normal(0.0, decades, curve.size)


def mlp_run(
    loss: np.ndarray,
    *,
    depth: int = 3,
    act: str = "ReLU",
    grad: float | np.ndarray | dict[str, Any] = 0.3,
    update_ratio: float | np.ndarray = 3e-3,
    lr: float | np.ndarray = 0.1,
    optimizer: str = "SGD",
    activations: dict[str, dict[str, Any]] | None = None,
    act_every: int = 10,
    output_nonfinite: dict[str, Any] | None = None,
    grad_missing: dict[str, Any] | None = None,
    input_std: float = 1.0,
    init_gain: float = 0.6,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    tail: dict[str, str] | None = None,
) -> Run:
    """A run of a ``depth``-layer MLP with ``act`` activations between Linear layers.

    ``grad`` is one value/series for every layer or ``{layer: series}``; gradient norms get 20%
    lognormal noise. ``init_gain`` is each Linear's output std over its input rms at the first sample.
    """
    n = len(loss)
    rng = np.random.default_rng(seed + 1)
    layers = [f"fc{i}" for i in range(depth - 1)] + ["head"]
    types: dict[str, str] = {}
    for i, layer in enumerate(layers):
        types[layer] = "Linear"
        if layer != "head":
            types[f"act{i}"] = act
    types.update(tail or {})  # parameter-free modules after the head (a final sigmoid)
    grads = grad if isinstance(grad, dict) else {layer: grad for layer in layers}
    grad_series = {
        layer: np.broadcast_to(np.asarray(grads.get(layer, 0.3), dtype=float), (n,)) * 10 ** rng.normal(0, 0.08, n)
        for layer in layers
    }
    ratio = np.broadcast_to(np.asarray(update_ratio, dtype=float), (n,))
    act_steps = np.arange(0, n, act_every) if n else np.zeros(0, dtype=int)
    k = len(act_steps)
    acts: dict[str, dict[str, Any]] = {m: dict(v) for m, v in (activations or {}).items()}
    # A forward pass at a healthy scale: each Linear scales its input rms by init_gain.
    std = acts.setdefault("act_std", {})
    mean = acts.setdefault("act_mean", {})
    std.setdefault("(input)", np.full(k, input_std))
    mean.setdefault("(input)", np.zeros(k))
    scale = input_std
    for i, layer in enumerate(layers):
        scale *= init_gain
        std.setdefault(layer, np.full(k, scale))
        mean.setdefault(layer, np.zeros(k))
        if layer != "head":
            std.setdefault(f"act{i}", np.full(k, scale * 0.58))
            mean.setdefault(f"act{i}", np.full(k, scale * 0.4))
            scale = scale * 0.71  # the rms of a ReLU output
    if act in {"ReLU", "ReLU6"}:
        dead = acts.setdefault("act_dead_frac", {})
        for i in range(depth - 1):
            dead.setdefault(f"act{i}", np.clip(0.03 + rng.normal(0, 0.01, k), 0, 1))
    if act in {"Sigmoid", "Tanh"}:
        sat = acts.setdefault("act_saturated_frac", {})
        for i in range(depth - 1):
            sat.setdefault(f"act{i}", np.full(k, 0.01))
    return synthetic_run(
        loss,
        grad_norm=grad_series,
        weight_norm={layer: np.full(n, 5.0) for layer in layers},
        update_norm={layer: 5.0 * ratio for layer in layers},
        grad_missing=grad_missing,
        output_nonfinite=output_nonfinite,
        activations=acts,
        activation_steps=act_steps,
        lr=lr,
        module_types=types,
        optimizer=optimizer,
        meta=meta,
    )


# ---------------------------------------------------------------------------- healthy runs


def healthy_sgd(n: int = 400) -> Run:
    return mlp_run(_noisy(np.geomspace(2.3, 0.08, n), 0.08, 1))


def healthy_noisy_small_batch(n: int = 400) -> Run:
    # Batches of 4: per-step losses swing by ±0.4 decades (×2.5) around a falling trend.
    return mlp_run(_noisy(np.geomspace(2.3, 0.1, n), 0.4, 2), grad=np.geomspace(0.5, 1.5, n))


def healthy_converged_early(n: int = 500) -> Run:
    curve = np.r_[np.geomspace(2.3, 0.002, 60), np.full(n - 60, 0.002)]
    return mlp_run(_noisy(curve, 0.15, 3), grad=np.r_[np.geomspace(1.0, 0.01, 60), np.full(n - 60, 0.01)])


def healthy_warmup_cosine(n: int = 400) -> Run:
    warm = 60
    lr = 0.1 * np.minimum(1.0, (np.arange(n) + 1) / warm) * 0.5 * (1 + np.cos(np.pi * np.arange(n) / n))
    # Flat while the learning rate ramps up, then falls.
    curve = np.r_[np.full(40, 2.3), np.geomspace(2.3, 0.05, n - 40)]
    ratio = 0.03 * lr / 0.1 + 1e-5
    return mlp_run(_noisy(curve, 0.08, 4), lr=lr, update_ratio=ratio)


def healthy_long_warmup(n: int = 300) -> Run:
    # A 2000-step warmup seen 300 steps in: the learning rate is still tiny and the loss barely moves.
    lr = 1e-3 * (np.arange(n) + 1) / 2000
    return mlp_run(_noisy(np.linspace(2.3, 2.1, n), 0.01, 5), lr=lr, update_ratio=lr * 2, optimizer="AdamW")


def healthy_step_decay(n: int = 450) -> Run:
    lr = np.where(np.arange(n) < 150, 0.1, np.where(np.arange(n) < 300, 0.01, 0.001))
    curve = np.r_[np.geomspace(2.3, 0.3, 150), np.geomspace(0.3, 0.1, 150), np.geomspace(0.1, 0.08, 150)]
    return mlp_run(_noisy(curve, 0.1, 6), lr=lr, update_ratio=0.05 * lr)


def healthy_regression_to_zero(n: int = 400) -> Run:
    # A loss that falls 12 decades to the float noise floor, where it jitters by a decade.
    curve = np.r_[np.geomspace(10.0, 1e-12, 250), np.full(n - 250, 1e-12)]
    return mlp_run(_noisy(curve, 0.3, 7), act="Tanh", grad=np.r_[np.geomspace(3, 1e-6, 250), np.full(n - 250, 1e-6)])


def healthy_regression_large_units(n: int = 400) -> Run:
    # MSE in large units that settles at its noise floor after a decade of progress.
    curve = np.r_[np.geomspace(6e5, 6e4, 150), np.full(n - 150, 6e4)]
    return mlp_run(_noisy(curve, 0.05, 8), grad=2e4, optimizer="Adam", lr=3e-2)


def healthy_amp_skip(n: int = 300) -> Run:
    # GradScaler: one overflowing step (inf gradients, finite loss) that was skipped.
    grad = np.full(n, 0.3)
    grad[137] = np.inf
    return mlp_run(_noisy(np.geomspace(2.3, 0.1, n), 0.08, 9), grad={"fc0": grad, "fc1": 0.3, "head": 0.3})


def healthy_lstm_growing_gradients(n: int = 300) -> Run:
    # LSTMs grow their gradient norm by ~2 decades while learning.
    return mlp_run(_noisy(np.geomspace(0.69, 0.04, n), 0.15, 10), grad=np.geomspace(0.05, 4.0, n), optimizer="Adam")


def healthy_final_sigmoid(n: int = 300) -> Run:
    # A binary classifier whose final sigmoid is confident (saturated): what training aims for.
    return mlp_run(
        _noisy(np.geomspace(0.69, 0.01, n), 0.2, 11),
        activations={"act_saturated_frac": {"out": np.full(n // 10, 0.95)}},
        tail={"out": "Sigmoid"},
    )


HEALTHY = {
    "sgd": healthy_sgd,
    "noisy_small_batch": healthy_noisy_small_batch,
    "converged_early": healthy_converged_early,
    "warmup_cosine": healthy_warmup_cosine,
    "long_warmup": healthy_long_warmup,
    "step_decay": healthy_step_decay,
    "regression_to_zero": healthy_regression_to_zero,
    "regression_large_units": healthy_regression_large_units,
    "amp_skip": healthy_amp_skip,
    "lstm_growing_gradients": healthy_lstm_growing_gradients,
    "final_sigmoid": healthy_final_sigmoid,
}

# ---------------------------------------------------------------------------- faulty runs


def diverged(n: int = 200, at: int = 30) -> Run:
    """SGD at lr=8: the loss falls, then blows up by 4 decades at step ``at`` and stays up."""
    curve = np.r_[np.geomspace(2.3, 1.0, at), np.geomspace(1.0, 2e4, 5), np.full(n - at - 5, 2e4)]
    grad = np.r_[np.full(at, 0.5), np.geomspace(0.5, 1e4, 5), np.full(n - at - 5, 1e3)]
    ratio = np.r_[np.full(3, 0.8), np.full(n - 3, 0.05)]
    return mlp_run(_noisy(curve, 0.05, 20), grad=grad, lr=8.0, update_ratio=ratio)


def nan_from(n: int = 200, at: int = 120, where: str = "fc1", input_first: bool = False, loss_only: bool = False) -> Run:
    """NaN from step ``at`` on: first in ``where``'s output (and everything after it in forward order),
    or in the input batch, or only in the loss (every module output finite at ``at``). From the next
    step on, the poisoned weights make every module's output non-finite."""
    loss = _noisy(np.geomspace(2.3, 0.2, n), 0.05, 21)
    loss[at:] = np.nan
    grad = np.full(n, 0.3)
    grad[at:] = np.nan
    modules = ["fc0", "act0", "fc1", "act1", "head"]
    outputs = {m: np.r_[np.zeros(at + 1), np.ones(n - at - 1)] for m in modules}
    outputs["(input)"] = np.zeros(n)
    if input_first:
        outputs["(input)"][at] = 1.0
        for m in modules:
            outputs[m][at] = 1.0
    elif not loss_only:
        for m in modules[modules.index(where) :]:
            outputs[m][at] = 1.0
    return mlp_run(loss, grad={"fc0": grad, "fc1": grad, "head": grad}, output_nonfinite=outputs)


def lr_too_low(n: int = 300) -> Run:
    return mlp_run(_noisy(np.full(n, 2.3), 0.005, 22), lr=1e-5, update_ratio=4e-6)


def deep_sigmoid(n: int = 300, depth: int = 10) -> Run:
    # The gradient shrinks ~8× per sigmoid layer on its way back: 1e-7 at fc0, 0.5 at the head.
    grads = {f"fc{i}": 0.5 * 8.0 ** -(depth - 1 - i) for i in range(depth - 1)}
    grads["head"] = 0.5
    return mlp_run(_noisy(np.full(n, 2.3), 0.01, 23), depth=depth, act="Sigmoid", grad=grads)


def dead_relu(n: int = 300, lr: float = 0.01, killed: bool = False) -> Run:
    k = n // 10
    dead = np.full(k, 0.97)
    if killed:
        dead[0] = 0.02  # alive at the first sample, dead after the first big updates
    ratio = np.r_[np.full(5, 0.6), np.full(n - 5, 1e-3)] if killed else 1e-3
    return mlp_run(
        _noisy(np.full(n, 2.3), 0.003, 24),
        lr=lr,
        update_ratio=ratio,
        activations={"act_dead_frac": {"act0": dead}},
    )


def saturated_tanh(n: int = 300) -> Run:
    k = n // 10
    return mlp_run(
        _noisy(np.full(n, 2.3), 0.005, 25),
        act="Tanh",
        activations={"act_saturated_frac": {"act0": np.full(k, 0.97), "act1": np.full(k, 0.9)}},
        input_std=380.0,
    )


def oscillating(n: int = 400, momentum: float = 0.99) -> Run:
    t = np.arange(n)
    curve = 1.0 * 10 ** (0.35 * np.sin(2 * np.pi * t / 12))
    opt = {"class": "SGD", "defaults": {"lr": 0.05}, "param_groups": [{"lr": 0.05, "momentum": momentum, "n_params": 3}]}
    run = mlp_run(_noisy(curve, 0.03, 26), lr=0.05)
    run.meta["optimizer"] = opt
    return run


def exploding_rnn(n: int = 300, optimizer: str = "SGD") -> Run:
    """An RNN whose first update is thrown by a 300× gradient spike into saturation: no learning after."""
    grad = np.r_[300.0, np.full(n - 1, 1.0)]
    ratio = np.r_[0.9, np.full(n - 1, 2e-3)]
    run = synthetic_run(
        _noisy(np.full(n, 0.69), 0.01, 27),
        grad_norm={"rnn": grad, "head": np.full(n, 0.8)},
        weight_norm={"rnn": np.full(n, 8.0), "head": np.full(n, 2.0)},
        update_norm={"rnn": 8.0 * ratio, "head": 2.0 * ratio},
        module_types={"rnn": "RNN", "head": "Linear"},
        optimizer=optimizer,
    )
    return run


def detached(n: int = 200) -> Run:
    return mlp_run(
        _noisy(np.geomspace(2.3, 0.1, n), 0.08, 28),
        grad={"fc0": 0.3, "fc1": 0.0, "head": 0.3},
        grad_missing={"fc1": np.ones(n)},
    )


FAULTY = {
    "diverged": diverged,
    "nan_from": nan_from,
    "lr_too_low": lr_too_low,
    "deep_sigmoid": deep_sigmoid,
    "dead_relu": dead_relu,
    "saturated_tanh": saturated_tanh,
    "oscillating": oscillating,
    "exploding_rnn": exploding_rnn,
    "detached": detached,
}
