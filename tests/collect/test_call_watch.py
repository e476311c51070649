"""The model's own forward is watched by a CallWatch from step 1 on, where that is safe: the same
checks as a forward hook at a fraction of its cost. These tests pin when it is used, that it checks
what the hook checked, and that a model compiled mid-run (which the watch cannot see into) moves
back to a forward hook without losing more than the one step it missed."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradscope
from gradscope.collect.hooks import CallWatch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _step(
    forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, mon: gradscope.Monitor, nan: bool
) -> None:
    x = torch.randn(8, 4)
    if nan:
        x[0] = math.nan
    opt.zero_grad()
    loss = forward(x).sum()
    loss.backward()
    mon.step(loss)
    opt.step()


def test_an_eager_model_is_watched_without_a_forward_hook_from_step_1(quiet: dict[str, Any]) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
        assert model._forward_hooks  # step 0: a hook, which also sees whether the forward is compiled
        _step(model, opt, mon, nan=False)
        assert not model._forward_hooks
        assert isinstance(mon._call_watch, CallWatch) and mon._call_watch.active
        for nan in (False, True, False):
            _step(model, opt, mon, nan)
        flags = mon.run.metric("output_nonfinite")
    assert not model._forward_hooks and "_compiled_call_impl" not in vars(model)  # close() takes the watch off
    # the NaN batch of step 2 is found in the input, as with the hook; the NaN weights it left make
    # step 3's loss NaN from a finite batch, which the output alone shows; step 1 was not checked
    assert flags["(input)"].iloc[2] == 1.0 and flags["(output)"].iloc[2] == 1.0
    assert flags["(input)"].iloc[3] == 0.0 and flags["(output)"].iloc[3] == 1.0
    assert flags[["(input)", "(output)"]].iloc[1].isna().all()


class _OwnCall(nn.Sequential):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # a class with its own __call__
        return super().__call__(*args, **kwargs)


def _two_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    # nn.DataParallel replicates a module's attributes over two devices or more
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)


def _own_call(monkeypatch: pytest.MonkeyPatch) -> None:
    pass


@pytest.mark.parametrize(
    ("make_model", "setup", "monitor_args"),
    [
        (_model, _two_accelerators, {}),
        (lambda: _OwnCall(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), _own_call, {}),
        (_model, _own_call, {"grad_scaler": "scaler"}),
    ],
    ids=["two-accelerators", "class-with-own-__call__", "grad-scaler"],
)
def test_where_the_watch_is_not_safe_the_forward_hook_stays(
    make_model: Callable[[], nn.Module], setup: Callable[[pytest.MonkeyPatch], None], monitor_args: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch, quiet: dict[str, Any],
) -> None:  # fmt: skip
    setup(monkeypatch)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if monitor_args.get("grad_scaler") == "scaler":
        monitor_args = {"grad_scaler": torch.amp.GradScaler("cpu")}
    with gradscope.Monitor(model, opt, activation_every=0, **monitor_args, **quiet) as mon:
        for nan in (False, False, True):
            _step(model, opt, mon, nan)
        assert model._forward_hooks and mon._call_watch is None
        assert "_compiled_call_impl" not in vars(model)
        flags = mon.run.metric("output_nonfinite")
    assert flags["(input)"].iloc[2] == 1.0


@pytest.mark.parametrize("how", ["model.compile()", "torch.compile(model)"])
def test_a_model_compiled_mid_run_is_never_read_as_checked_when_the_watch_cannot_see_it(
    how: str, quiet: dict[str, Any]
) -> None:
    """model.compile() replaces the watch and torch.compile traces the module's call around it: the
    step after the switch finds no forward seen and stores its input and output as not checked,
    never as finite, and a forward hook takes over. An in-place compile runs it; a graph
    torch.compile compiled without it does not (dynamo skips hook guards on the module it
    compiles), which is warned once, the later steps also stored as not checked."""
    torch._dynamo.reset()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
        for _ in range(3):
            _step(model, opt, mon, nan=False)
        assert mon._call_watch is not None
        forward: Callable[[torch.Tensor], torch.Tensor] = model
        if how == "torch.compile(model)":
            forward = torch.compile(model, backend="aot_eager")
        else:
            model.compile(backend="aot_eager")
        _step(forward, opt, mon, nan=True)  # step 3: compiled, unseen by the watch
        assert mon._call_watch is None and model._forward_hooks
        if how == "torch.compile(model)":
            with pytest.warns(RuntimeWarning, match="compile it before its first step"):
                _step(forward, opt, mon, nan=False)  # step 4: the hook did not run either
        else:
            _step(forward, opt, mon, nan=False)
        _step(forward, opt, mon, nan=True)
        flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]]
        assert mon.steps_recorded == 6
    assert flags.iloc[3].isna().all()  # the NaN batch of step 3: not checked, never "finite"
    if how == "model.compile()":
        assert flags.iloc[5].tolist() == [1.0, 1.0]  # the hook, compiled in, finds the next one
        assert "_compiled_call_impl" in vars(model)  # close() leaves the user's compile alone
    else:
        assert flags.iloc[4:].isna().all().all()
        assert "_compiled_call_impl" not in vars(model)
