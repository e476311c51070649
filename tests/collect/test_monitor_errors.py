"""Every misuse of the Monitor a user can make raises an InvalidInputError that says what to do."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradscope


@pytest.fixture
def model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_a_non_module_model(model: nn.Module) -> None:
    with pytest.raises(gradscope.InvalidInputError, match=r"expected model to be a torch\.nn\.Module but got dict"):
        gradscope.Monitor({"weights": 1})  # type: ignore[arg-type]


def test_a_module_class_instead_of_an_instance() -> None:
    with pytest.raises(gradscope.InvalidInputError, match=r"but got type \(a class was given: instantiate it\)"):
        gradscope.Monitor(nn.Linear)  # type: ignore[arg-type]


def test_something_else_as_optimizer(model: nn.Module) -> None:
    with pytest.raises(gradscope.InvalidInputError, match=r"expected optimizer to be a torch\.optim\.Optimizer but got list"):
        gradscope.Monitor(model, [p for p in model.parameters()])  # type: ignore[arg-type]


def test_an_optimizer_that_owns_none_of_the_models_parameters(model: nn.Module) -> None:
    other = torch.optim.SGD(nn.Linear(3, 4).parameters(), lr=0.1)
    with pytest.raises(
        gradscope.InvalidInputError,
        match=r"expected an optimizer that owns the model's parameters but SGD holds none of the 4 trainable parameters of Sequential; create the optimizer from model\.parameters\(\)",
    ):
        gradscope.Monitor(model, other)


def test_an_optimizer_owning_some_parameters_is_recorded_in_the_metadata(model: nn.Module) -> None:
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with gradscope.Monitor(model, opt, on_finding=None) as mon:
        pass
    assert mon.run.meta["params_not_in_optimizer"] == ["2.weight", "2.bias"]


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (torch.ones(3), r"expected a scalar loss but got a tensor of shape \(3,\); reduce it first \(loss\.mean\(\)\)"),
        (torch.ones(2, 2), r"expected a scalar loss but got a tensor of shape \(2, 2\)"),
        ("0.5", r"expected the loss as a scalar tensor or a number but got str"),
        (True, r"expected the loss as a scalar tensor or a number but got bool"),
    ],
)
def test_a_loss_that_is_not_a_scalar(model: nn.Module, loss: Any, message: str) -> None:
    with gradscope.Monitor(model, on_finding=None) as mon:
        with pytest.raises(gradscope.InvalidInputError, match=message):
            mon.step(loss)
        mon.step(torch.ones(1, 1))  # one element is a scalar in any shape
        mon.step(0.25)
        mon.step(None)  # no loss: recorded as NaN
    assert mon.run.loss.tolist()[:2] == [1.0, 0.25]


def test_step_after_close(model: nn.Module) -> None:
    mon = gradscope.Monitor(model, on_finding=None)
    mon.close()
    with pytest.raises(gradscope.InvalidInputError, match=r"step\(\) called after the Monitor was closed; create a new Monitor"):
        mon.step(1.0)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("flush_every", 0, r"expected flush_every to be an integer ≥ 1 but got 0"),
        ("flush_every", -5, r"expected flush_every to be an integer ≥ 1 but got -5"),
        ("flush_every", 2.5, r"expected flush_every to be an integer ≥ 1 but got 2\.5"),
        ("flush_every", True, r"expected flush_every to be an integer ≥ 1 but got True"),
        ("activation_every", -1, r"expected activation_every to be an integer ≥ 0 but got -1"),
        ("update_every", "10", r"expected update_every to be an integer ≥ 0 but got '10'"),
        ("detect_every", 0, r"expected detect_every to be an integer ≥ 1 but got 0"),
        ("on_finding", "loud", r"expected on_finding to be 'warn', 'raise', a callable or None but got 'loud'"),
    ],
)
def test_invalid_option_values(model: nn.Module, option: str, value: object, message: str) -> None:
    with pytest.raises(gradscope.InvalidInputError, match=message):
        gradscope.Monitor(model, **{option: value})


def test_a_second_monitor_on_a_log_dir_in_use(model: nn.Module, tmp_path: Path) -> None:
    with gradscope.Monitor(model, log_dir=tmp_path, on_finding=None) as first:
        with pytest.raises(
            gradscope.InvalidInputError,
            match=re.escape(f"log_dir {str(tmp_path)!r} is being written by another Monitor") + r".*give each run its own log_dir",
        ):
            gradscope.Monitor(nn.Linear(2, 2), log_dir=tmp_path, overwrite=True)
        first.step(1.0)
    assert gradscope.load(tmp_path).n_steps == 1  # the refused second Monitor did not disturb the first


def test_an_existing_run_needs_overwrite(model: nn.Module, tmp_path: Path) -> None:
    with gradscope.Monitor(model, log_dir=tmp_path, on_finding=None) as mon:
        mon.step(1.0)
        mon.step(2.0)
    with pytest.raises(gradscope.InvalidInputError, match=r"already holds a run; choose a new directory or pass overwrite=True"):
        gradscope.Monitor(model, log_dir=tmp_path)
    assert gradscope.load(tmp_path).n_steps == 2  # untouched
    with gradscope.Monitor(model, log_dir=tmp_path, overwrite=True, on_finding=None) as mon:
        mon.step(3.0)
    run = gradscope.load(tmp_path)
    assert run.loss.tolist() == [3.0]


def test_a_log_dir_that_is_a_file(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(gradscope.InvalidInputError, match=r"expected log_dir to be a directory but .* is a file"):
        gradscope.Monitor(model, log_dir=path)


@pytest.mark.parametrize("option", ["select", "ignore"])
def test_an_unknown_detector_code_is_refused_when_the_monitor_is_created(model: nn.Module, option: str, tmp_path: Path) -> None:
    # Checked then, not at the first live detection mid-training, where it could only be a warning.
    with pytest.raises(gradscope.InvalidInputError, match=r"expected detector codes among .*nonfinite.* but got exploding_los$"):
        gradscope.Monitor(model, log_dir=tmp_path / "run", **{option: ["nonfinite", "exploding_los"]})
    assert not (tmp_path / "run").exists()  # nothing was created
