"""The framework examples run as tests, healthy and with a learning rate far too high."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import gradscope

EXAMPLES = Path(__file__).parents[2] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lightning_example_is_healthy_and_stops_a_diverging_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lightning.pytorch")
    example = _load("lightning_example")
    healthy = example.main(str(tmp_path / "healthy"), max_epochs=2)
    assert str(tmp_path / "healthy") in capsys.readouterr().out  # it says where the run went
    run = gradscope.load(tmp_path / "healthy")
    assert run.n_steps == 2 * 29 and run.status == "complete"  # 1797 digits in batches of 64
    assert run.loss[-5:].mean() < 0.2 < 2.0 < run.loss[0]
    assert healthy.findings.by_severity("warning") == []

    with pytest.warns(RuntimeWarning, match="gradscope: error"):
        diverged = example.main(str(tmp_path / "diverged"), lr=50.0, max_epochs=3)
    assert gradscope.load(tmp_path / "diverged").n_steps < 3 * 29  # on_finding="stop" ended it early
    assert any(f.code == "exploding_loss" for f in diverged.findings)


def test_the_transformers_example_is_healthy_and_explodes_at_a_huge_learning_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = _load("transformers_example")
    healthy = example.main(str(tmp_path / "healthy"), max_steps=40)
    assert str(tmp_path / "healthy") in capsys.readouterr().out
    run = gradscope.load(tmp_path / "healthy")
    assert run.n_steps == 40 and np.isfinite(run.loss).all()
    assert run.loss[-5:].mean() < 0.7 * run.loss[0]  # it learns
    assert healthy.findings.by_severity("warning") == []

    with pytest.warns(RuntimeWarning, match="gradscope: error: exploding_loss"):
        diverged = example.main(str(tmp_path / "diverged"), lr=3.0, max_steps=30)
    errors = [f for f in diverged.findings if f.severity is gradscope.Severity.ERROR]
    assert [f.code for f in errors] == ["exploding_loss"]
    assert errors[0].step is not None and errors[0].step <= 2
    assert errors[0].fix_kinds[0] == "learning_rate"
    assert gradscope.load(tmp_path / "diverged").loss.max() > 10 * run.loss[0]
