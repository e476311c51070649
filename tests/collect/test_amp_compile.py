"""Mixed precision (GradScaler, bf16 autocast) and torch.compile: the recorded numbers stay right."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradscope

quiet = {"on_finding": None}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("order", ["before", "after"])
def test_grad_scaler_gradients_are_recorded_unscaled(order: str) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    expected = []
    with gradscope.Monitor(model, opt, grad_scaler=scaler, flush_every=4, **quiet) as mon:
        for x, y in _batches(9):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            expected.append([float(p.grad.norm()) / scale for p in model.parameters()])  # type: ignore[union-attr]
            if order == "before":
                mon.step(loss)
            scaler.step(opt)
            scaler.update()
            if order == "after":
                mon.step(loss)
    run = mon.run
    recorded = run.metric("param_grad_norm").to_numpy()
    np.testing.assert_allclose(recorded, np.array(expected), rtol=1e-5)
    assert run.scalar("optimizer_skipped").tolist() == [0.0] * 9


def test_steps_the_grad_scaler_skips_are_recorded_as_skipped() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Scale 2^127 (float32 tops out near 2^128): the first step's loss is made 1000× larger so its
    # scaled gradients overflow to Inf; the scaler skips that step and backs off to 2^119.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-8)
    weights_before = [p.detach().clone() for p in model.parameters()]
    with gradscope.Monitor(model, opt, grad_scaler=scaler, flush_every=3, **quiet) as mon:
        for i, (x, y) in enumerate(_batches(6)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss * (1e3 if i == 0 else 1.0)).backward()
            mon.step(loss)
            scaler.step(opt)
            scaler.update()
    run = mon.run
    skipped = run.scalar("optimizer_skipped")
    assert skipped.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert math.isnan(run.grad_norm[0])  # never read: optimizer.step() did not run
    assert np.isfinite(run.grad_norm[skipped == 0]).all()
    assert not all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters(), strict=True))


def test_grad_scaler_needs_an_optimizer_and_a_real_scaler() -> None:
    with pytest.raises(gradscope.InvalidInputError, match="expected an optimizer with grad_scaler"):
        gradscope.Monitor(_model(), grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(gradscope.InvalidInputError, match=r"expected grad_scaler to be a torch\.amp\.GradScaler"):
        model = _model()
        gradscope.Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=2.0)  # type: ignore[arg-type]


def test_bf16_autocast_statistics_are_float32_and_close_to_full_precision() -> None:
    recorded = {}
    for dtype in (None, torch.bfloat16):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradscope.Monitor(model, opt, activation_every=1, update_every=1, **quiet) as mon:
            for x, y in _batches(3):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                    loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                mon.step(loss)
                opt.step()
        recorded[dtype] = mon.run
    full, half = recorded[None], recorded[torch.bfloat16]
    for metric in ("grad_norm", "act_std", "act_max_abs"):
        a, b = full.metric(metric).to_numpy(), half.metric(metric).to_numpy()
        mask = np.isfinite(a)
        assert np.isfinite(b[mask]).all()
        np.testing.assert_allclose(b[mask], a[mask], rtol=0.05)  # bf16 keeps ~3 significant digits


def test_hooks_attached_before_torch_compile_still_record() -> None:
    runs = []
    for compiled in (False, True):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradscope.Monitor(model, opt, activation_every=1, update_every=1, **quiet) as mon:
            forward = torch.compile(model, backend="aot_eager") if compiled else model
            for x, y in _batches(3):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(forward(x), y)
                loss.backward()
                mon.step(loss)
                opt.step()
        runs.append(mon.run)
    eager, compiled_run = runs
    for metric in ("grad_norm", "update_norm", "act_mean", "act_dead_frac"):
        np.testing.assert_allclose(compiled_run.metric(metric).to_numpy(), eager.metric(metric).to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(compiled_run.loss, eager.loss, rtol=1e-6)
