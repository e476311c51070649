"""The model's own forward is watched by a CallWatch from step 1 on, where that is safe: the same
checks as a forward hook at a fraction of its cost. These tests pin when it is used, that it checks
what the hook checked, and that a model compiled mid-run (which the watch cannot see into) moves
back to a forward hook without losing more than the one step it missed."""

from __future__ import annotations

import copy
import math
import pickle
import warnings
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


def _no_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    pass


def _with_pre_hook(model: nn.Module) -> nn.Module:
    # a hook of the user's own: PyTorch's general call path anyway, and it may change the input
    model.register_forward_pre_hook(lambda module, args: None)
    return model


@pytest.mark.parametrize(
    ("make_model", "setup", "monitor_args"),
    [
        (_model, _two_accelerators, {}),
        (lambda: _OwnCall(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), _no_setup, {}),
        (_model, _no_setup, {"grad_scaler": "scaler"}),
        (lambda: _with_pre_hook(_model()), _no_setup, {}),
    ],
    ids=["two-accelerators", "class-with-own-__call__", "grad-scaler", "user-pre-hook"],
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


class _Net(nn.Module):
    """A model class of the user's: torch.compile traces its call through the watch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(
    ("make_model", "how", "checked_after"),
    [
        (_model, "model.compile()", True),
        (_model, "torch.compile(model)", False),
        (_Net, "model.compile()", True),
        (_Net, "torch.compile(model)", True),
    ],
    ids=["Sequential-in-place", "Sequential-wrapped", "own-class-in-place", "own-class-wrapped"],
)
def test_a_model_compiled_mid_run_is_never_read_as_checked_when_nothing_checked_it(
    make_model: Callable[[], nn.Module], how: str, checked_after: bool, quiet: dict[str, Any]
) -> None:
    """Compiled after its first steps, the model runs without the watch where model.compile()
    replaces it, and where torch.compile calls forward around it (PyTorch's own module classes; a
    class of the user's is traced through it, and stays checked). The step that finds no call
    stores its input and output as not checked, never as finite, and a forward hook takes over: an
    in-place compile runs it, a torch.compile graph compiled without it does not, which is warned
    once, the later steps also stored as not checked."""
    torch._dynamo.reset()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
            for _ in range(3):
                _step(model, opt, mon, nan=False)
            assert mon._call_watch is not None
            forward: Callable[[torch.Tensor], torch.Tensor] = model
            if how == "torch.compile(model)":
                forward = torch.compile(model, backend="aot_eager")
            else:
                model.compile(backend="aot_eager")
            for nan in (True, False, True):  # steps 3 to 5; the NaN weights of step 3 make every later loss NaN
                _step(forward, opt, mon, nan)
            flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]]
    silence = [w for w in caught if "no training forward reached the model's hook" in str(w.message)]
    if make_model is _Net and how == "torch.compile(model)":
        assert mon._call_watch is None and not silence  # closed; it stayed on throughout
        assert flags.iloc[3:].to_numpy().tolist() == [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]
        return
    assert flags.iloc[3].isna().all()  # the NaN batch of step 3: not checked, never "finite"
    if checked_after:
        assert flags.iloc[4:].to_numpy().tolist() == [[0.0, 1.0], [1.0, 1.0]] and not silence
        assert "_compiled_call_impl" in vars(model)  # close() leaves the user's compile alone
    else:
        assert flags.iloc[4:].isna().all().all()
        assert len(silence) == 1 and "steps 3 and 4" in str(silence[0].message)
        assert "_compiled_call_impl" not in vars(model)


def test_a_step_without_a_training_forward_is_stored_as_not_checked(quiet: dict[str, Any]) -> None:
    """Not as finite: nothing was checked. Such a step (evaluation only, or no call at all) hands
    the model back to a forward hook, which checks the next forward and, that forward having run
    eagerly, hands it to the watch again; no warning, as the next step's forward reached the hook."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def nan_step() -> None:
        opt.zero_grad()
        x = torch.randn(8, 4)
        x[0] = math.nan
        model(x).sum().backward()
        mon.step(math.nan)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        with gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
            _step(model, opt, mon, nan=False)  # step 0: the hook, then the watch
            nan_step()  # step 1: the watch finds the NaN batch
            assert mon._call_watch is not None
            with torch.no_grad():
                model(torch.full((8, 4), math.nan))
            mon.step(1.0)  # step 2: evaluation only
            assert mon._call_watch is None and model._forward_hooks
            nan_step()  # step 3: the hook finds it, and gives way to the watch again
            assert mon._call_watch is not None and not model._forward_hooks
            mon.step(1.0)  # step 4: no call at all
            nan_step()  # step 5: the hook again
            flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]]
    assert [flags.iloc[i].tolist() for i in (1, 3, 5)] == [[1.0, 1.0]] * 3
    assert flags.iloc[[2, 4]].isna().all().all()


def test_a_loop_that_never_calls_the_model_itself_stores_its_input_as_not_checked(quiet: dict[str, Any]) -> None:
    """A training step that calls the model's submodules (as a LightningModule's training_step may)
    never reaches the model's hook: its input and output were stored as finite; they are not checked."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
            for _ in range(3):
                opt.zero_grad()
                loss = model[2](model[1](model[0](torch.full((8, 4), math.nan)))).sum()
                loss.backward()
                mon.step(loss)
                opt.step()
            assert mon._call_watch is None
            flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]]
    assert flags.isna().all().all()


class _StateDictCopy(nn.Sequential):
    """A class that copies its __dict__ itself, as LightningModule.__getstate__ does."""

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _parametrized() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    torch.nn.utils.parametrize.register_parametrization(model, "weight", _Identity())
    return model


class _Identity(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w


def _pickled(model: nn.Module) -> nn.Module:
    """A round trip through pickle, as torch.save(model) makes."""
    copied: nn.Module = pickle.loads(pickle.dumps(model))
    return copied


def _own_getstate() -> nn.Module:
    torch.manual_seed(0)
    return _StateDictCopy(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


@pytest.mark.parametrize(
    ("make_model", "copy_model"),
    [
        (_own_getstate, copy.deepcopy),
        (_own_getstate, copy.copy),
        (_own_getstate, _pickled),
        (_parametrized, copy.deepcopy),  # (torch refuses to pickle a parametrized module)
    ],
    ids=["own-__getstate__-deepcopy", "own-__getstate__-copy", "own-__getstate__-pickle", "parametrized-deepcopy"],
)
def test_a_copy_made_past_module_getstate_keeps_no_watch(
    make_model: Callable[[], nn.Module], copy_model: Callable[[nn.Module], nn.Module], quiet: dict[str, Any]
) -> None:
    """The watch copies and pickles as None, so such a copy runs its own weights, not the
    original's, and the Monitor sees none of its forwards."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
        for _ in range(2):
            _step(model, opt, mon, nan=False)
        assert isinstance(vars(model).get("_compiled_call_impl"), CallWatch)
        twin = copy_model(model)
        if copy_model is copy.copy:  # shares the original's parameters: the original's call is its own
            assert twin._compiled_call_impl is None or twin(torch.zeros(1, 4)).shape == (1, 2)
        else:
            assert twin._compiled_call_impl is None
            with torch.no_grad():
                for p in twin.parameters():
                    p.add_(1.0)
            x = torch.randn(3, 4)
            assert not torch.allclose(twin(x), model(x))
            twin(torch.full((8, 4), math.nan)).sum().backward()  # a training forward of the copy
            _step(model, opt, mon, nan=False)
            flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]]
            assert not (flags == 1.0).any().any()  # the copy's NaN batch was not seen


def test_an_input_check_that_failed_is_stored_as_not_checked_from_then_on(
    monkeypatch: pytest.MonkeyPatch, quiet: dict[str, Any]
) -> None:
    """A sum that raised is reported once and skipped from then on: the steps it would have checked
    store "not checked", never the finite zero that stands in for a sum not taken."""
    from gradscope.collect import monitor

    def broken(total: Any, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected")

    monkeypatch.setattr(monitor, "_add_sum", broken)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match="injected"), gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
        for _ in range(3):
            _step(model, opt, mon, nan=True)  # a NaN batch and loss: the sums are due every step
        flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]]
    assert flags.isna().all().all()


def test_compiled_right_after_step_0_the_model_is_not_checked_and_that_is_warned(quiet: dict[str, Any]) -> None:
    """The watch takes over at the end of step 0; a torch.compile graph that then runs around it
    (and around the hook that replaces it) is noticed at steps 1 and 2."""
    torch._dynamo.reset()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
        _step(model, opt, mon, nan=False)
        compiled = torch.compile(model, backend="aot_eager")
        _step(compiled, opt, mon, nan=True)
        with pytest.warns(RuntimeWarning, match="at steps 1 and 2"):
            _step(compiled, opt, mon, nan=True)
        flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]]
    assert flags.iloc[1:].isna().all().all()


def test_a_step_tried_again_without_a_new_forward_checks_nothing(monkeypatch: pytest.MonkeyPatch, quiet: dict[str, Any]) -> None:
    """step() failed midway (strict=True raises gradscope's own errors) and is called again: the
    forward it saw went with the failed attempt, so the retry stores its input and output as not
    checked, never as finite, and warns of nothing."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    read = gradscope.Monitor._read_gradient_norms
    calls = iter(range(100))

    def second_read_fails(self: gradscope.Monitor, out: Any, row: int) -> None:
        if next(calls) == 1:
            raise RuntimeError("injected")
        read(self, out, row)

    monkeypatch.setattr(gradscope.Monitor, "_read_gradient_norms", second_read_fails)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradscope.Monitor(model, opt, activation_every=0, strict=True, **quiet) as mon:
            _step(model, opt, mon, nan=False)  # step 0
            opt.zero_grad()
            x = torch.randn(8, 4)
            x[0] = math.nan
            loss = model(x).sum()
            loss.backward()
            with pytest.raises(RuntimeError, match="injected"):
                mon.step(loss)  # step 1 fails midway: not recorded
            mon.step(loss)  # tried again, with no new forward
            _step(model, opt, mon, nan=True)  # step 2
            flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]]
    assert mon.steps_recorded == 3
    assert flags.iloc[1].isna().all()
    assert flags.iloc[2].tolist() == [1.0, 1.0]


def test_a_step_with_a_compiled_and_an_eager_forward_keeps_the_hook(quiet: dict[str, Any]) -> None:
    """The main loss through torch.compile(model), an auxiliary one through the model itself: a
    watch would see the eager call alone, so the hook stays, compiled in, and checks both."""
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
        for nan in (False, False, True):
            opt.zero_grad()
            x = torch.randn(8, 4)
            if nan:
                x[0] = math.nan
            loss = compiled(x).sum() + 0.1 * model(torch.randn(8, 4)).sum()
            loss.backward()
            mon.step(loss)
            opt.step()
            assert mon._call_watch is None and model._forward_hooks
        flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]]
    assert flags.iloc[2].tolist() == [1.0, 1.0]


def test_a_pre_hook_added_under_the_watch_hands_the_check_back_to_the_hook(quiet: dict[str, Any]) -> None:
    """The watch sees the arguments as passed; a forward pre-hook may change them before the model
    does (here it cleans the NaN out). The step that finds one is not checked, and the hook, which
    sees what the model saw, takes over."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradscope.Monitor(model, opt, activation_every=0, check_outputs=True, **quiet) as mon:
            for _ in range(2):
                _step(model, opt, mon, nan=False)
            assert mon._call_watch is not None
            model.register_forward_pre_hook(lambda module, args: (torch.nan_to_num(args[0]),))
            for _ in range(4):  # steps 2-5: NaN batches, cleaned before the model sees them
                _step(model, opt, mon, nan=True)
            assert mon._call_watch is None and model._forward_hooks
            flags = mon.run.metric("output_nonfinite")[["(input)", "(output)"]]
    assert flags.iloc[2].isna().all()
    assert flags.iloc[3:].to_numpy().tolist() == [[0.0, 0.0]] * 3


def test_each_silent_stretch_is_warned(quiet: dict[str, Any]) -> None:
    """Two steps that evaluate only warn once; when training forwards reach the model again and a
    compiled model later runs around it, that is warned too."""
    torch._dynamo.reset()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.Monitor(model, opt, activation_every=0, **quiet) as mon:
        for _ in range(2):
            _step(model, opt, mon, nan=False)  # steps 0, 1
        with torch.no_grad():
            model(torch.randn(8, 4))
        mon.step(1.0)  # step 2
        with pytest.warns(RuntimeWarning, match="at steps 2 and 3"):
            mon.step(1.0)  # step 3
        for _ in range(2):
            _step(model, opt, mon, nan=False)  # steps 4, 5: the check is back
        compiled = torch.compile(model, backend="aot_eager")
        _step(compiled, opt, mon, nan=False)  # step 6
        with pytest.warns(RuntimeWarning, match="at steps 6 and 7"):
            _step(compiled, opt, mon, nan=False)  # step 7
