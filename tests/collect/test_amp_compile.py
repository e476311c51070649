"""Mixed precision (GradScaler, bf16 autocast), torch.compile, and traces of the model
(torch.jit.trace, torch.export) between steps: the recorded numbers stay right."""

from __future__ import annotations

import math
from collections.abc import Callable

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


@pytest.mark.parametrize("held", [False, True], ids=["read at once", "held on the device"])
@pytest.mark.parametrize("where", ["after backward", "after unscale_"])
def test_grad_scaler_gradients_are_recorded_before_clipping(
    where: str, held: bool, device_gradients: Callable[[gradscope.Monitor], gradscope.Monitor]
) -> None:
    # PyTorch's recipe for clipping under a GradScaler: unscale_, clip, then scaler.step. The norms
    # recorded are the ones backward produced, unscaled, with step() before the clipping, as they are
    # without a scaler: a blow-up the clipping catches still shows in them.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    expected = []
    mon = gradscope.Monitor(model, opt, grad_scaler=scaler, flush_every=4, **quiet)
    if held:
        device_gradients(mon)  # the scale is then divided out on the device, as on an accelerator
    with mon:
        for x, y in _batches(9):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) * 100  # gradients well above the clipping norm
            scaler.scale(loss).backward()
            if where == "after backward":
                mon.step(loss)
            scaler.unscale_(opt)
            expected.append([float(p.grad.norm()) for p in model.parameters()])  # type: ignore[union-attr]
            if where == "after unscale_":
                mon.step(loss)
            clipped = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01))
            assert clipped > 1  # the clipping did bite
            scaler.step(opt)
            scaler.update()
    recorded = mon.run.metric("param_grad_norm").to_numpy()
    np.testing.assert_allclose(recorded, np.array(expected), rtol=1e-5)
    assert mon.run.scalar("optimizer_skipped").tolist() == [0.0] * 9


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
    assert not np.isfinite(run.grad_norm[0])  # the overflow that made the scaler skip
    assert np.isfinite(run.grad_norm[skipped == 0]).all()
    assert not all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters(), strict=True))


def test_a_skipped_step_recorded_after_scaler_update_is_not_unscaled_twice() -> None:
    # step() after scaler.update(), on a step the scaler skips: scaler.step() unscaled the gradients
    # but optimizer.step() never ran, and update() cleared the scaler's record of it. Only the scale
    # having changed since the forward says so; the finite layers must not be divided again.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    expected = []
    with gradscope.Monitor(model, opt, grad_scaler=scaler, flush_every=3, **quiet) as mon:
        for i, (x, y) in enumerate(_batches(6)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if i in (0, 3):
                model[2].bias.grad[0] = math.inf  # type: ignore[index]  # the scaler skips this step
            scale = scaler.get_scale()
            expected.append([float(p.grad.norm()) / scale for p in model.parameters()])  # type: ignore[union-attr]
            scaler.step(opt)
            scaler.update()
            mon.step(loss)
    run = mon.run
    assert run.scalar("optimizer_skipped").tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    recorded = run.metric("param_grad_norm").to_numpy()
    np.testing.assert_allclose(recorded, np.array(expected), rtol=1e-5)  # the Inf bias included


def test_a_large_scale_does_not_overflow_the_norms_held_on_the_device(
    device_gradients: Callable[[gradscope.Monitor], gradscope.Monitor],
) -> None:
    # The squares of gradients scaled by 2^70 pass float32's range (~3.4e38) where the unscaled
    # norms are ordinary: on an accelerator they are summed in float64 before the scale is divided out.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**70, growth_interval=10**6)
    expected = []
    with device_gradients(gradscope.Monitor(model, opt, grad_scaler=scaler, flush_every=4, **quiet)) as mon:
        for x, y in _batches(6):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            expected.append([float(p.grad.double().norm()) / 2.0**70 for p in model.parameters()])  # type: ignore[union-attr]
            mon.step(loss)
            scaler.step(opt)
            scaler.update()
    assert mon.run.scalar("optimizer_skipped").tolist() == [0.0] * 6
    np.testing.assert_allclose(mon.run.metric("param_grad_norm").to_numpy(), np.array(expected), rtol=1e-5)


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


@pytest.mark.parametrize(
    ("how", "backend"),
    [("compiled after", "aot_eager"), ("compiled after", "inductor"), ("compiled before", "aot_eager"), ("compiled in place", "aot_eager")],
)
def test_a_compiled_model_records_what_the_eager_one_does(how: str, backend: str) -> None:
    """``torch.compile(model)`` after the Monitor, ``Monitor(torch.compile(model))`` and
    ``model.compile()``. Sampled and other steps alternate, so both compiled variants run.
    Inductor refused the sampled steps' CPU work buffer (a mutation of a graph input) until the
    hooks stopped using it while compiled; and the hooks read a step count, which recompiled the
    model on every sampled step, until they read a flag: no frame is compiled after the first
    steps. Compiled before or in place, the graph did not notice the hooks come and go, and every
    sampled step after step 0 lost its statistics: the hooks now stay attached there."""
    from torch._dynamo.utils import counters

    runs = []
    for compiled in (False, True):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch._dynamo.reset()
        counters.clear()
        watched: nn.Module = torch.compile(model, backend=backend) if compiled and how == "compiled before" else model
        with gradscope.Monitor(watched, opt, activation_every=2, update_every=1, **quiet) as mon:
            forward = watched
            if compiled and how == "compiled after":
                forward = torch.compile(model, backend=backend)
            elif compiled and how == "compiled in place":
                model.compile(backend=backend)
            for i, (x, y) in enumerate(_batches(9)):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(forward(x), y)
                loss.backward()
                mon.step(loss)
                opt.step()
                if i == 3:
                    frames_after_warmup = counters["frames"]["ok"]
        runs.append(mon.run)
        if compiled:
            assert 0 < counters["frames"]["ok"] == frames_after_warmup  # no recompiling on later sampled steps
    eager, compiled_run = runs
    for metric in ("grad_norm", "update_norm", "act_mean", "act_dead_frac"):
        np.testing.assert_allclose(compiled_run.metric(metric).to_numpy(), eager.metric(metric).to_numpy(), rtol=1e-5)
    assert compiled_run.metric("act_mean").notna().all(axis=1).sum() == 5  # steps 0, 2, 4, 6, 8
    # the model's hook runs compiled in, and its checks are stored as the eager model's watch stores them
    flags = compiled_run.metric("output_nonfinite")
    np.testing.assert_array_equal(flags.to_numpy(), eager.metric("output_nonfinite").to_numpy())  # NaN: not checked
    assert flags[["(input)", "(output)"]].iloc[::2].notna().all().all()  # checked on the sampled steps
    np.testing.assert_allclose(compiled_run.loss, eager.loss, rtol=1e-6)


@pytest.mark.parametrize("trace", ["jit.trace", "export"])
def test_a_trace_of_the_model_between_steps_is_no_training_forward(trace: str) -> None:
    """``torch.jit.trace`` runs the model twice with grad on and compares the graphs (the kept
    input made them differ); ``torch.export`` runs the hooks on placeholder tensors (stored as a
    NaN input batch, and a false finding). A trace is not a training step: the hooks skip it."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.Monitor(model, opt, activation_every=2, **quiet) as mon:
        for i, (x, y) in enumerate(_batches(4)):
            if i == 2:
                if trace == "jit.trace":
                    torch.jit.trace(model, (x,))
                else:
                    torch.export.export(model, (x,))
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
        run = mon.run
    assert run.n_steps == 4
    assert not (run.metric("output_nonfinite").to_numpy() == 1).any()
    assert run.metric("act_mean").notna().all(axis=1).sum() == 2  # steps 0 and 2
    assert "nonfinite" not in [f.code for f in gradscope.diagnose(run)]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_model_compiled_by_regions_records_what_the_eager_one_does(when: str) -> None:
    """``block.compile()`` on each repeated block: the modules inside a block's graph kept the
    hooks of the step it was traced on, so sampled steps after step 0 lost their statistics,
    until the Monitor looked for compiled submodules too."""
    runs = []
    for compiled in (False, True):
        model = _Blocks()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch._dynamo.reset()
        if compiled and when == "before":
            for block in model.blocks:
                block.compile(backend="aot_eager")
        with gradscope.Monitor(model, opt, activation_every=3, update_every=1, **quiet) as mon:
            if compiled and when == "after":
                for block in model.blocks:
                    block.compile(backend="aot_eager")
            for x, y in _batches(8):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                mon.step(loss)
                opt.step()
        runs.append(mon.run)
    eager, compiled_run = runs
    for metric in ("act_mean", "act_dead_frac", "grad_norm"):
        np.testing.assert_allclose(compiled_run.metric(metric).to_numpy(), eager.metric(metric).to_numpy(), rtol=1e-5)
    assert compiled_run.metric("act_mean").notna().all(axis=1).sum() == 3  # steps 0, 3, 6
