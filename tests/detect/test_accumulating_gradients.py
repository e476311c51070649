"""``accumulating_gradients``: a loop that never resets its gradients, on synthetic and real runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import synth
import torch
from torch import nn

import gradscope
from gradscope.datasets import load_digits
from gradscope.testing import synthetic_run


def _codes(run: gradscope.Run) -> set[str]:
    return {f.code for f in gradscope.diagnose(run)}


def test_a_running_sum_of_gradients_is_named_with_its_layers() -> None:
    rng = np.random.default_rng(0)
    n = 200
    per_batch = np.abs(rng.normal(0.5, 0.15, n))
    summed = np.cumsum(per_batch)  # what .grad holds when nothing resets it
    run = synthetic_run(
        synth._noisy(np.geomspace(2.3, 1.0, n), 0.05, 40), grad_norm={"fc0": summed, "fc1": summed, "head": per_batch}
    )
    f = next(f for f in gradscope.diagnose(run) if f.code == "accumulating_gradients")
    assert f.layers == ("fc0", "fc1") and f.step == 0
    assert f.fixes[0].kind.value == "code" and "optimizer.zero_grad()" in f.fixes[0].action


@pytest.mark.parametrize(
    "grad",
    [
        np.abs(np.random.default_rng(1).normal(0.5, 0.15, 200)),  # batch noise
        np.geomspace(0.05, 1.0, 200) * np.exp(np.random.default_rng(2).normal(0, 0.2, 200)),  # a rising trend (LSTM, warmup)
        np.geomspace(1.0, 0.01, 200),  # full batch: smooth, falling
        0.01 * 1.08 ** np.arange(200.0),  # leaving a plateau (or blowing up): smooth, but exponential
    ],
    ids=["noise", "rising-trend", "full-batch", "exponential"],
)
def test_healthy_gradient_norms_are_no_sum(grad: np.ndarray) -> None:
    run = synthetic_run(synth._noisy(np.geomspace(2.3, 0.1, 200), 0.05, 41), grad_norm={"fc0": grad, "head": grad[::-1]})
    assert "accumulating_gradients" not in _codes(run)


def _digits_run(tmp_path: Path, zero_grad: bool) -> gradscope.Run:
    torch.manual_seed(0)
    images, labels = load_digits(size=8)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    with gradscope.Monitor(model, opt, log_dir=tmp_path / "run", on_finding=None) as mon:
        for _ in range(120):
            i = torch.randint(0, len(images), (32,), generator=g)
            if zero_grad:
                opt.zero_grad()
            loss = nn.functional.cross_entropy(model(images[i]), labels[i])
            loss.backward()
            mon.step(loss)
            opt.step()
    return gradscope.load(tmp_path / "run")


@pytest.mark.parametrize("zero_grad", [False, True], ids=["zero_grad-forgotten", "zero_grad-called"])
def test_a_real_loop_that_forgets_zero_grad(tmp_path: Path, zero_grad: bool) -> None:
    assert ("accumulating_gradients" in _codes(_digits_run(tmp_path, zero_grad))) is not zero_grad
