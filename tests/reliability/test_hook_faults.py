"""Odd values inside the hooks: a module returning an exotic object, an object that fails when looked
at, tensor subclasses, sparse gradients, complex parameters and outputs, meta and empty tensors.

What may happen: the statistic that cannot be taken is skipped, with at most one warning naming the
module; training goes on unchanged; every other statistic is exactly what it is without the fault.
Each fault sits in a parameter-free ``side`` module whose output the model ignores, so a run with
the fault and one with ``nn.Identity`` in its place train identically and must record the same
numbers everywhere but on ``side``.

``tests/collect/test_hook_edge_cases.py`` covers tuples, dicts, None and integer outputs, which
need no warning at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from reliability_support import batch, detector_errors, gradscope_warnings, train
from torch import nn

import gradscope

STEPS = 6


class Net(nn.Module):
    def __init__(self, side: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.Tanh()
        self.side = side  # called on the hidden activations; its output is ignored
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        self.side(h)
        return self.fc2(h)


class Returns(nn.Module):
    """A parameter-free module returning ``make(h)``."""

    def __init__(self, make: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.make = make

    def forward(self, h: torch.Tensor) -> Any:
        return self.make(h)


class Bag:
    """An exotic output: an object that merely holds a tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class Unreadable(tuple):  # type: ignore[type-arg]
    """A tuple that raises when iterated: looking at the output fails inside the hook."""

    def __iter__(self) -> Any:
        raise RuntimeError("this output cannot be iterated")


class NoSum(torch.Tensor):
    """A tensor subclass whose reductions raise (a quantised or lazily evaluated tensor type)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in ("sum", "aminmax", "dot"):
            raise RuntimeError(f"{cls.__name__} does not support {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


class Plain(torch.Tensor):
    """A tensor subclass that behaves like a tensor: it must be measured like one."""


def record(side: nn.Module, **options: Any) -> tuple[gradscope.Run, list[str], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Net(side)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    settings = {"flush_every": 2, "activation_every": 1, "update_every": 1, "on_finding": None, **options}
    with gradscope_warnings() as warned, gradscope.Monitor(model, opt, **settings) as mon:
        train(model, opt, mon, STEPS)
    return mon.run, warned, [p.detach().clone() for p in model.parameters()]


def without(frame: pd.DataFrame, module: str) -> pd.DataFrame:
    return frame[frame["layer"] != module].reset_index(drop=True)


@pytest.fixture(scope="module")
def healthy() -> tuple[gradscope.Run, list[str], list[torch.Tensor]]:
    return record(nn.Identity())


def assert_same_elsewhere(run: gradscope.Run, params: list[torch.Tensor], healthy: Any) -> None:
    """Training went on unchanged and every statistic but those of ``side`` equals the healthy run's."""
    good_run, good_warned, good_params = healthy
    assert good_warned == []
    for a, b in zip(params, good_params, strict=True):
        assert torch.equal(a, b)
    pd.testing.assert_frame_equal(without(run.to_pandas(), "side"), without(good_run.to_pandas(), "side"))
    assert good_run.metric("act_mean")["side"].notna().all()


@pytest.mark.parametrize(
    ("make", "warning"),
    [
        pytest.param(lambda h: Bag(h), None, id="exotic-object"),
        pytest.param(lambda h: "a string", None, id="a-string"),
        pytest.param(lambda h: torch.empty(h.shape, device="meta"), None, id="meta-tensor"),
        pytest.param(lambda h: h[:, :0], None, id="empty-tensor"),
        pytest.param(lambda h: torch.complex(h, h), None, id="complex-output"),
        pytest.param(lambda h: Unreadable((h,)), "RuntimeError: this output cannot be iterated", id="fails-when-read"),
        pytest.param(lambda h: h.as_subclass(NoSum), "RuntimeError: NoSum does not support aminmax", id="tensor-subclass-refusing-reductions"),
    ],
)
def test_an_odd_output_is_skipped_with_at_most_one_warning(make: Any, warning: str | None, healthy: Any) -> None:
    run, warned, params = record(Returns(make))
    if warning is None:
        assert warned == []
    else:
        assert warned == [f"gradscope: statistics of side are skipped from now on: {warning}"]  # once in 6 steps
    assert run.metric("act_mean")["side"].isna().all()
    assert run.n_steps == STEPS
    assert_same_elsewhere(run, params, healthy)


def test_a_tensor_subclass_that_behaves_is_measured_like_a_tensor(healthy: Any) -> None:
    run, warned, params = record(Returns(lambda h: h.as_subclass(Plain)))
    assert warned == []
    pd.testing.assert_frame_equal(run.to_pandas(), healthy[0].to_pandas())
    assert_same_elsewhere(run, params, healthy)


def test_strict_raises_a_hook_failure_into_the_forward() -> None:
    torch.manual_seed(0)
    model = Net(Returns(lambda h: Unreadable((h,))))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.Monitor(model, opt, strict=True, on_finding=None) as mon, pytest.raises(RuntimeError, match="cannot be iterated"):
        train(model, opt, mon, 1)
    assert mon.steps_recorded == 0


# --------------------------------------------------------------------------- sparse and complex gradients


class Tokens(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, sparse=sparse)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx).mean(dim=1))  # (B, T, 8) → (B, 3)


def _token_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 20, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)


def test_sparse_gradients_are_measured_like_dense_ones() -> None:
    runs = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = Tokens(sparse)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with gradscope_warnings() as warned, gradscope.Monitor(model, opt, flush_every=2, activation_every=1, update_every=1, on_finding=None) as mon:
            train(model, opt, mon, STEPS, make_batch=_token_batch)
        assert warned == []
        runs.append(mon.run)
    dense, sparse_run = (r.to_pandas() for r in runs)
    pd.testing.assert_frame_equal(dense[["step", "layer", "metric"]], sparse_run[["step", "layer", "metric"]])
    np.testing.assert_allclose(sparse_run["value"], dense["value"], rtol=1e-5, atol=1e-7)
    assert (runs[1].metric("grad_norm")["embed"] > 0).all()


class HalfComplex(nn.Module):
    """A complex layer (as in spectral or signal models) feeding a real head."""

    def __init__(self) -> None:
        super().__init__()
        self.spectral = nn.Linear(6, 4, dtype=torch.cfloat)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.spectral(x.to(torch.cfloat))  # (B, 4) complex
        return self.head(torch.view_as_real(z).flatten(1))  # (B, 8) real


def _train_complex(steps: int = STEPS) -> tuple[gradscope.Run, list[str], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = HalfComplex()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = []
    with gradscope_warnings() as warned, gradscope.Monitor(model, opt, flush_every=2, activation_every=1, update_every=1, on_finding=None) as mon:
        for step in range(steps):
            x, y = batch(step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            mon.step()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
            after = {n: p.detach().clone() for n, p in model.named_parameters()}
            trace.append({"grad": grads, "before": before, "after": after})  # type: ignore[dict-item]
    return mon.run, warned, trace  # type: ignore[return-value]


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.cat([t.reshape(-1).abs().double() for t in tensors]).norm())


def test_complex_parameters_have_the_right_gradient_norms_and_training_goes_on() -> None:
    run, warned, trace = _train_complex()
    assert run.n_steps == STEPS
    assert len(warned) <= 1
    for layer in ("spectral", "head"):
        expected = [_norm([t["grad"][f"{layer}.weight"], t["grad"][f"{layer}.bias"]]) for t in trace]  # type: ignore[index]
        np.testing.assert_allclose(run.metric("grad_norm")[layer], expected, rtol=1e-5)
    assert run.metric("act_mean")["spectral"].isna().all()  # a complex output is not an activation statistic
    assert run.metric("act_mean")["head"].notna().all()


def test_complex_parameters_do_not_spoil_the_update_norms_of_other_layers() -> None:
    run, warned, trace = _train_complex()
    assert warned == []
    for layer in ("spectral", "head"):
        names = (f"{layer}.weight", f"{layer}.bias")
        weight = [_norm([t["after"][n] for n in names]) for t in trace]  # type: ignore[index]
        update = [_norm([t["after"][n] - t["before"][n] for n in names]) for t in trace]  # type: ignore[index]
        np.testing.assert_allclose(run.metric("weight_norm")[layer], weight, rtol=1e-5)
        np.testing.assert_allclose(run.metric("update_norm")[layer], update, rtol=1e-5)


# --------------------------------------------------------------------------- an empty batch


def test_an_empty_batch_is_recorded_as_what_it_is_and_training_goes_on() -> None:
    def sometimes_empty(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch(step)
        return (x[:0], y[:0]) if step == 2 else (x, y)

    torch.manual_seed(0)
    model = Net(nn.Identity())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    with gradscope_warnings() as warned, gradscope.Monitor(model, opt, flush_every=2, activation_every=1, update_every=1, on_finding=None) as mon:
        for step in range(STEPS):
            x, y = sometimes_empty(step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)  # mean over no example: NaN
            loss.backward()
            mon.step(loss)
            grads.append(_norm([p.grad for p in model.parameters() if p.grad is not None]))
            opt.step()
    assert warned == []
    run = mon.run
    assert np.isnan(run.loss[2]) and np.isfinite(np.delete(run.loss, 2)).all()
    np.testing.assert_allclose(run.grad_norm, grads, rtol=1e-5)
    assert run.grad_norm[2] == 0.0  # an empty batch gives zero gradients
    assert 2 not in run.activation_steps.tolist()  # nothing to measure: no activation row at all
    assert run.activation_steps.tolist() == [0, 1, 3, 4, 5]
    assert detector_errors(gradscope.diagnose(run)) == []
