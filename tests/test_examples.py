"""The examples run as tests: ``examples/quickstart.py`` trains the 784-128-10 network and records it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import gradscope

EXAMPLES = Path(__file__).parents[1] / "examples"


def _load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_records_the_784_128_10_network_and_the_loss_falls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quickstart = _load_example("quickstart")
    returned = quickstart.main(str(tmp_path / "run"), steps=60)
    out = capsys.readouterr().out
    assert str(tmp_path / "run") in out  # it says where the data went

    run = gradscope.load(tmp_path / "run")
    assert run.n_steps == returned.n_steps == 60
    assert run.status == "complete"
    assert run.layers == ["0", "2"]
    numels = dict(zip(run.params, run.meta["param_numels"], strict=True))
    assert numels == {"0.weight": 784 * 128, "0.bias": 128, "2.weight": 128 * 10, "2.bias": 10}
    assert numels["0.weight"] + numels["2.weight"] == 101_632
    assert sum(numels.values()) == 101_770
    assert run.modules["1"].type == "ReLU"
    assert np.isfinite(run.loss).all()
    first, last = run.loss[0], run.loss[-10:].mean()
    assert first > 2.0  # ten classes start near ln(10) ≈ 2.30
    assert last < 0.5 * first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    assert (run.metric("grad_norm") > 0).all().all()
